"""Generation with a preallocated KV cache: one jitted prefill + `lax.while_loop` decode program per shape bucket
(for streaming, the same two halves as two programs: the decode loop runs one token per call). The reply length is
a bucket too: a program has room for `slots` new tokens and stops at a `stop` it is given, so every max_new_tokens
of one bucket runs the same program and none decodes past its own.

The same program continues from a cache that already holds a prefix (RAG caching: the KV states of an embedding
pass). Layout conventions (see docs/DESIGN.md "Model"):
- prompts are right-padded; row b's prompt tokens sit at positions start_B[b] + [0, len_b);
- the cache has one write slot (`index`) shared by the batch; padding slots stay `valid=False`, so no row ever
  attends to padding, and the causal mask compares positions, not slots;
- a row stops after emitting `</s>`; later tokens of that row are padding.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grit_jax.data import templates
from grit_jax.errors import GritJaxError
from grit_jax.inference.placement import generation_params
from grit_jax.modeling.model import KVCache, Transformer

# Number of times each jitted program was traced (= compiled): tests check that bucketing keeps this small.
TRACE_COUNTS: dict[str, int] = {}
MIN_LENGTH_BUCKET = 16


def _count_trace(name: str) -> None:
  TRACE_COUNTS[name] = TRACE_COUNTS.get(name, 0) + 1


def bucket(n: int, cap: int | None = None, minimum: int = MIN_LENGTH_BUCKET) -> int:
  """Smallest power of two >= n (at least `minimum`), clipped to `cap`: shapes come from a short fixed list."""
  b = max(minimum, 1 << max(0, int(n) - 1).bit_length())
  return max(int(n), min(b, cap)) if cap else b


def reply_slots(max_new_tokens: int, minimum: int = MIN_LENGTH_BUCKET) -> int:
  """The reply room of the program that generates max_new_tokens: the cache-size rule, at least `minimum`."""
  return bucket_slots(max(int(max_new_tokens), minimum))


def bucket_slots(n: int) -> int:
  """Cache sizes: powers of two up to 1024, then multiples of 512 (a long cached document wastes <= 512 slots)."""
  return bucket(n) if n <= 1024 else -(-int(n) // 512) * 512


# ---------------------------------------------------------------------------------------------------------------
# KV cache plumbing (caches are pytrees: k, v [L, B, S, KVH, Dh], positions [B, S], valid [B, S], index [])


def make_cache(k, v, positions, valid, index) -> KVCache:
  return KVCache(k=k, v=v, positions=positions, valid=valid, index=jnp.asarray(index, jnp.int32))


def pad_cache(cache: KVCache, length: int) -> KVCache:
  """Room for `length` slots in total; new slots are invalid (never attended) and writes continue at `index`."""
  extra = length - cache.k.shape[2]
  if extra < 0:
    raise ValueError(f"cache has {cache.k.shape[2]} slots, cannot shrink to {length}")
  if extra == 0:
    return cache
  kv_pad = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
  return make_cache(jnp.pad(cache.k, kv_pad), jnp.pad(cache.v, kv_pad),
                    jnp.pad(cache.positions, ((0, 0), (0, extra))),
                    jnp.pad(cache.valid, ((0, 0), (0, extra))), cache.index)


def concat_caches(first: KVCache, second: KVCache) -> KVCache:
  """[first | second] along the slot axis (the paper's Query-Doc / Doc-Query). Each keeps its own RoPE positions
  (both start at 0, as in the reference) and validity; writes continue after both."""
  s1, s2 = first.index, second.index
  cut = lambda c, n: (c.k[:, :, :n], c.v[:, :, :n], c.positions[:, :n], c.valid[:, :n])
  a, b = cut(first, int(s1)), cut(second, int(s2))
  return make_cache(*(jnp.concatenate([x, y], axis=2 if x.ndim == 5 else 1) for x, y in zip(a, b)),
                    int(s1) + int(s2))


def stack_caches(rows: Sequence[tuple[np.ndarray, np.ndarray]], length: int | None = None,
                 dtype=None) -> KVCache:
  """Batch per-row caches (k, v each [L, n_b, KVH, Dh], positions 0..n_b-1) into one right-padded KVCache whose
  valid mask marks the padding. `length` = slots to allocate (default: the longest row)."""
  lens = [int(k.shape[1]) for k, _ in rows]
  length = length or max(lens)
  L, _, kvh, dh = rows[0][0].shape
  dtype = dtype or rows[0][0].dtype
  k = np.zeros((L, len(rows), length, kvh, dh), dtype)  # [L, B, S, KVH, Dh]
  v = np.zeros_like(k)
  valid = np.zeros((len(rows), length), bool)
  positions = np.zeros((len(rows), length), np.int32)
  for b, ((kb, vb), n) in enumerate(zip(rows, lens)):
    k[:, b, :n], v[:, b, :n] = kb, vb
    valid[b, :n] = True
    positions[b, :n] = np.arange(n)
  return make_cache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions), jnp.asarray(valid), max(lens))


def unstack_cache(cache: KVCache) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per-row (k, v) [L, n_b, KVH, Dh] of the valid slots (right padding dropped): what an index stores."""
  k, v, valid = np.asarray(cache.k), np.asarray(cache.v), np.asarray(cache.valid)
  return [(k[:, b, valid[b]], v[:, b, valid[b]]) for b in range(valid.shape[0])]


# ---------------------------------------------------------------------------------------------------------------
# sampling


def sample_token(logits_BV, rng, temperature, top_p, greedy: bool):
  """Greedy argmax, or temperature + nucleus (top-p) sampling. top_p keeps the smallest set of tokens whose
  probability reaches top_p (the most likely token is always kept, so a tiny top_p is greedy)."""
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p  # mass strictly before each token
  keep_BV = keep_BV.at[:, 0].set(True)
  cutoff_B = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1)
  logits_BV = jnp.where(logits_BV >= cutoff_B[:, None], logits_BV, -jnp.inf)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# jitted programs


@functools.lru_cache(maxsize=None)
def continuation_logits_fn(config):
  """jit(params, cache, ids [B,T], mask [B,T], start [B]) -> (logits [B,T,V], cache): one causal call appending
  `ids` after whatever the cache holds; row b's tokens get positions start[b] + arange(T)."""
  module = Transformer(config)

  def fn(params, cache, ids_BT, mask_BT, start_B):
    _count_trace("continuation_logits")
    pos_BT = start_B[:, None] + jnp.arange(ids_BT.shape[1], dtype=jnp.int32)[None]
    out = module.apply({"params": params}, ids_BT, mask_BT, causal=True, positions=pos_BT, cache=cache,
                       return_logits=True)
    return out.logits, out.cache

  return jax.jit(fn)


def _prefill(module, params, cache, ids_BT, mask_BT, start_B, rng, temperature, top_p, *, greedy, stop_at_eos,
             max_new_tokens):
  """One causal call writes the (right-padded) prompt into the cache after its prefix and samples the first token.
  Returns the decode state (i = tokens so far, cache, last token [B], its position [B], done [B], tokens [B, N])."""
  eos, pad = module.config.eos_token_id, 0
  B, T = ids_BT.shape
  pos_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
  out = module.apply({"params": params}, ids_BT, mask_BT, causal=True, positions=pos_BT, cache=cache,
                     return_logits=True)
  len_B = mask_BT.sum(-1).astype(jnp.int32)
  last_BV = jnp.take_along_axis(out.logits, jnp.maximum(len_B - 1, 0)[:, None, None], axis=1)[:, 0]
  tok_B = sample_token(last_BV, jax.random.fold_in(rng, 0), temperature, top_p, greedy)
  done_B = (tok_B == eos) if stop_at_eos else jnp.zeros((B,), bool)
  tokens_BN = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok_B)
  return jnp.int32(1), out.cache, tok_B, start_B + len_B, done_B, tokens_BN


def _decode(module, params, state, stop, rng, temperature, top_p, *, greedy, stop_at_eos):
  """The `lax.while_loop` of single-token calls from the state's i until `stop` tokens (or every row done). Step i
  samples with fold_in(rng, i), so decoding in pieces gives the tokens of one call."""
  eos, pad = module.config.eos_token_id, 0

  def cond(state):
    i, _, _, _, done_B, _ = state
    return (i < stop) & ~jnp.all(done_B)

  def body(state):
    i, cache, tok_B, pos_B, done_B, tokens_BN = state
    out = module.apply({"params": params}, tok_B[:, None], jnp.ones((tok_B.shape[0], 1), jnp.int32), causal=True,
                       positions=pos_B[:, None], cache=cache, return_logits=True)
    nxt_B = sample_token(out.logits[:, 0], jax.random.fold_in(rng, i), temperature, top_p, greedy)
    nxt_B = jnp.where(done_B, pad, nxt_B)
    tokens_BN = tokens_BN.at[:, i].set(nxt_B)
    if stop_at_eos:
      done_B = done_B | (nxt_B == eos)
    return i + 1, out.cache, nxt_B, pos_B + 1, done_B, tokens_BN

  return jax.lax.while_loop(cond, body, state)


@functools.lru_cache(maxsize=None)
def generate_fn(config, slots: int, greedy: bool, stop_at_eos: bool = True):
  """jit(params, cache, ids [B,T], mask [B,T], start [B], rng, temperature, top_p, stop) -> tokens [B, slots]:
  the prefill and the whole decode loop (stopping when every row has emitted `</s>`, or after `stop` <= slots
  tokens; the rest is padding) in one program. The cache must have room for prefix + T + stop - 1 slots.
  """
  module = Transformer(config)
  kw = dict(greedy=greedy, stop_at_eos=stop_at_eos)

  def fn(params, cache, ids_BT, mask_BT, start_B, rng, temperature, top_p, stop):
    _count_trace("generate")
    state = _prefill(module, params, cache, ids_BT, mask_BT, start_B, rng, temperature, top_p,
                     max_new_tokens=slots, **kw)
    return _decode(module, params, state, stop, rng, temperature, top_p, **kw)[-1]

  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def stream_fns(config, slots: int, greedy: bool):
  """(prefill, decode) as two programs, for streaming: prefill(generate_fn's arguments but `stop`) -> state;
  decode(params, state, stop, rng, temperature, top_p) -> state, decoding until `stop` tokens (state donated: the
  cache is updated in place)."""
  module = Transformer(config)
  kw = dict(greedy=greedy, stop_at_eos=True)

  def prefill(params, cache, ids_BT, mask_BT, start_B, rng, temperature, top_p):
    _count_trace("stream_prefill")
    return _prefill(module, params, cache, ids_BT, mask_BT, start_B, rng, temperature, top_p,
                    max_new_tokens=slots, **kw)

  def decode(params, state, stop, rng, temperature, top_p):
    _count_trace("stream_decode")
    return _decode(module, params, state, stop, rng, temperature, top_p, **kw)

  return jax.jit(prefill), jax.jit(decode, donate_argnums=(1,))


# ---------------------------------------------------------------------------------------------------------------
# host-side drivers


def pad_rows(seqs: Sequence[Sequence[int]], length: int, rows: int, filler: int):
  """Right-pad token lists into ids/mask [rows, length]; filler rows (batch bucketing) hold one BOS token."""
  ids = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), np.int32)
  for b in range(rows):
    s = seqs[b] if b < len(seqs) else [filler]
    ids[b, :len(s)], mask[b, :len(s)] = s, 1
  return ids, mask


def check_sampling(temperature: float, top_p: float, names=("temperature", "top_p")) -> None:
  """A finite temperature >= 0 and 0 < top_p <= 1: NaN logits would sample nothing and end the answer at once."""
  if not math.isfinite(temperature) or temperature < 0:
    raise GritJaxError(f"{names[0]}={temperature}: must be a finite number >= 0 (0 = greedy)")
  if not 0 < top_p <= 1:
    raise GritJaxError(f"{names[1]}={top_p}: must be in (0, 1]")


def _prepared(model, cache: KVCache | None, seqs: Sequence[Sequence[int]], start, max_new_tokens: int,
              temperature: float, top_p: float, seed: int, slots: int) -> tuple:
  """generate_fn's arguments for `seqs` but `stop` (checked; shapes bucketed: rows and continuation length to powers
  of two; the cache has room for `slots` new tokens)."""
  if max_new_tokens < 1:
    raise GritJaxError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  check_sampling(temperature, top_p)
  n = len(seqs)
  if any(len(s) == 0 for s in seqs):
    raise GritJaxError("empty prompt: every row needs at least one token")
  prefix = 0 if cache is None else int(np.asarray(cache.valid).sum(-1).max())
  need = (prefix if start is None else int(np.max(start))) + max(len(s) for s in seqs) + max_new_tokens
  if need > model.config.max_position_embeddings:  # before the cache is allocated: a named error, not an OOM
    raise GritJaxError(f"prompt + max_new_tokens={max_new_tokens} reaches position {need} > the model's "
                       f"max_position_embeddings={model.config.max_position_embeddings}")
  rows = n if cache is not None else bucket(n, minimum=1)
  T = bucket(max(len(s) for s in seqs))
  ids, mask = pad_rows(seqs, T, rows, model.config.bos_token_id)
  if cache is None:
    cache = KVCache.init(model.config, rows, T + slots, jnp.dtype(model.config.dtype))
  else:
    if cache.k.shape[1] != n:
      raise GritJaxError(f"cache has {cache.k.shape[1]} rows, got {n} continuations")
    cache = pad_cache(cache, bucket_slots(int(cache.index) + T + slots))
  if start is None:
    start = np.asarray(cache.valid).sum(-1)
  start = jnp.asarray(np.asarray(start, np.int32))
  return (generation_params(model), cache, jnp.asarray(ids), jnp.asarray(mask), start, jax.random.PRNGKey(seed),
          jnp.float32(temperature or 1.0), jnp.float32(top_p))


def generate_from_cache(model, cache: KVCache | None, seqs: Sequence[Sequence[int]], start=None, *,
                        max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                        stop_at_eos: bool = True, min_slots: int = MIN_LENGTH_BUCKET) -> list[list[int]]:
  """Continue each row of `cache` (None = empty) with its token list `seqs[b]` and generate. `start[b]` = first
  position of the continuation (default: the row's number of valid cached tokens). Returns the new token ids per
  row, cut after `</s>` (which is kept). Shapes are bucketed: rows and continuation length to powers of two, the
  reply's room by reply_slots(max_new_tokens, min_slots) (a server passes its default reply length, so every reply
  up to it shares one program)."""
  slots = reply_slots(max_new_tokens, min_slots)
  args = _prepared(model, cache, seqs, start, max_new_tokens, temperature, top_p, seed, slots)
  fn = generate_fn(model.config, slots, temperature == 0.0, stop_at_eos)
  tokens = np.asarray(fn(*args, jnp.int32(max_new_tokens)))[:, :max_new_tokens]
  eos = model.config.eos_token_id
  result = []
  for row in tokens[:len(seqs)].tolist():
    result.append(row[:row.index(eos) + 1] if stop_at_eos and eos in row else row)
  return result


def generate_stream(model, prompt_ids: Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0, min_slots: int = MIN_LENGTH_BUCKET) -> Iterator[list[int]]:
  """One prompt's new token ids as they are decoded, one per program call: the tokens generate_ids gives (same
  sampling stream), ending after `</s>` (yielded). Closing the generator stops the decoding."""
  slots = reply_slots(max_new_tokens, min_slots)
  params, cache, ids, mask, start, rng, temp, top_p_ = _prepared(model, None, [prompt_ids], None, max_new_tokens,
                                                                 temperature, top_p, seed, slots)
  prefill, decode = stream_fns(model.config, slots, temperature == 0.0)
  state, sent, eos = prefill(params, cache, ids, mask, start, rng, temp, top_p_), 0, model.config.eos_token_id
  while True:
    i = int(state[0])
    new = np.asarray(state[5][0, sent:i]).tolist()
    sent = i
    if eos in new:
      yield new[:new.index(eos) + 1]
      return
    yield new
    if i >= max_new_tokens:
      return
    state = decode(params, state, jnp.int32(i + 1), rng, temp, top_p_)


def as_prompts(prompts_or_messages) -> list[list[str]]:
  """A batch of prompts as turn lists. A single string, or a single conversation of chat messages (a list of
  dicts), is a batch of one."""
  x = prompts_or_messages
  if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and all(isinstance(m, dict) for m in x)):
    x = [x]
  return [templates.turns_of(item, f"prompts[{i}]") for i, item in enumerate(x)]


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                 min_slots: int = MIN_LENGTH_BUCKET) -> list[list[int]]:
  """Token-level generation for already tokenized prompts (BOS included if wanted)."""
  return generate_from_cache(model, None, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, stop_at_eos=stop_at_eos, min_slots=min_slots)


def precompile(model, rows: int, prompt_len: int, max_new_tokens: int, *, greedy: bool = True,
               stream: bool = False) -> int:
  """Compile the program(s) that generate_ids (stream=False) or generate_stream (stream=True) run for `rows`
  prompts of up to `prompt_len` tokens and replies in max_new_tokens' bucket, by running them for a token or two.
  Returns how many programs that is (a stream has two)."""
  slots = reply_slots(max_new_tokens)
  args = _prepared(model, None, [[model.config.bos_token_id] * prompt_len] * rows, None, 1, 0.0 if greedy else 1.0,
                   1.0, 0, slots)
  if stream:
    prefill, decode = stream_fns(model.config, slots, greedy)
    decode(args[0], prefill(*args), jnp.int32(2), *args[5:])
    return 2
  generate_fn(model.config, slots, greedy, True)(*args, jnp.int32(1))
  return 1


def decode_new(tokenizer, ids: Sequence[int], eos_id: int) -> str:
  ids = list(ids)
  if eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  return tokenizer.decode(ids)

