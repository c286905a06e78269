"""Embeddings: GritLM template, one bidirectional (or causal, for `cc` models) pass, pooling over the text tokens.

Texts are sorted by token length and cut into batches; each batch is padded to a length bucket (a power of two,
at least 16, capped at max_length) and a row bucket (a power of two, capped at batch_size), so the number of
compiled programs stays at about log2(max_length) x log2(batch_size) whatever the inputs. Output order is the
input order.
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grit_jax import contract, objectives
from grit_jax.errors import GritJaxError
from grit_jax.inference.generate import _count_trace, bucket
from grit_jax.modeling.model import KVCache, Transformer

POOLINGS = objectives.POOLINGS + ("cls",)  # cls: the first token's state (BOS), as gritlm's


def embedding_is_causal(attn: str | None) -> bool:
  """GritLM's `attn` string (grit_jax.contract.parse_attn): chars 1-2 the embedding passes; None is gritlm's
  "leave the model causal". Queries and passages are embedded alike here, so the mixed cb/bc training ablations
  are not served (as in gritlm)."""
  if attn is None:
    return True
  mode = contract.parse_attn(attn, key="attn")
  if mode.query_causal != mode.passage_causal:
    raise GritJaxError(f"attn={attn!r}: mixed query/passage attention is not served (as in gritlm); "
                       "expected bbcc, cccc, bb, cc or None")
  return mode.query_causal


@functools.lru_cache(maxsize=None)
def embed_fn(config, causal: bool, pooling: str, normalize: bool, with_cache: bool):
  """jit(params, ids [B,T], mask [B,T], pool_mask [B,T]) -> (emb [B,D] float32, KVCache of T slots or None).

  With `with_cache` the pass also writes its keys/values into a fresh cache: the embedding and the RAG cache
  come from the same forward pass."""
  module = Transformer(config)

  def fn(params, ids_BT, mask_BT, pool_BT):
    _count_trace("embed_cache" if with_cache else "embed")
    B, T = ids_BT.shape
    cache = KVCache.init(config, B, T, jnp.dtype(config.dtype)) if with_cache else None
    out = module.apply({"params": params}, ids_BT, mask_BT, causal=causal, cache=cache, return_logits=False)
    if pooling == "cls":
      emb_BD = objectives.l2_normalize(out.hidden[:, 0]) if normalize else out.hidden[:, 0].astype(jnp.float32)
    else:
      emb_BD = objectives.pool(out.hidden, pool_BT, method=pooling, normalize=normalize)  # float32
    return emb_BD, out.cache

  return jax.jit(fn)


def tokenize(model, texts: Sequence[str], instruction: str, max_length: int):
  """(ids, pool_mask) per text through the GritLM embedding template (data.templates)."""
  from grit_jax.data import templates
  if model.tokenizer is None:
    raise GritJaxError("encode needs a tokenizer (tokenizer.model next to the weights)")
  out = []
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise GritJaxError(f"texts[{i}] is {type(t).__name__}, expected str")
    try:
      ids, pool = templates.encode_embedding(model.tokenizer, instruction, t, max_length)
    except GritJaxError as e:
      raise GritJaxError(f"texts[{i}]: {e}") from e
    out.append((np.asarray(ids, np.int32), np.asarray(pool, np.int32)))
  return out


def batches(tokens, batch_size: int, max_length: int, bos_id: int,
            row_multiple: int = 1) -> Iterator[tuple[np.ndarray, ...]]:
  """Longest-first batches: (row indices, ids, mask, pool_mask) padded to the length/row buckets (rows a multiple
  of `row_multiple`, the number of devices the batch is split over)."""
  order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i][0]))
  for s in range(0, len(order), batch_size):
    idx = order[s:s + batch_size]
    T = bucket(len(tokens[idx[0]][0]), cap=max_length)
    rows = -(-bucket(len(idx), cap=batch_size, minimum=1) // row_multiple) * row_multiple
    ids = np.zeros((rows, T), np.int32)   # [B, T]
    mask = np.zeros((rows, T), np.int32)
    pool = np.zeros((rows, T), np.int32)
    for b, i in enumerate(idx):
      t, p = tokens[i]
      ids[b, :len(t)], mask[b, :len(t)], pool[b, :len(t)] = t, 1, p
    for b in range(len(idx), rows):  # filler rows: one BOS token, dropped afterwards
      ids[b, 0], mask[b, 0], pool[b, 0] = bos_id, 1, 1
    yield np.asarray(idx), ids, mask, pool


PROGRESS_MIN_TEXTS = 256  # as gritlm: a progress bar for inputs of at least this many texts


def _data_parallel(model, devices):
  """(params replicated over `devices`, sharding that splits a batch's rows over them); one mesh per device set and
  one replicated copy of the params per model, reused across calls."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  key = tuple(d.id for d in devices)
  cached = getattr(model, "_data_parallel", None)
  if cached is None or cached[0] != key or cached[1] is not model.params:
    mesh = Mesh(np.asarray(devices), ("data",))
    params = jax.device_put(model.params, NamedSharding(mesh, PartitionSpec()))
    cached = (key, model.params, params, NamedSharding(mesh, PartitionSpec("data")))
    model._data_parallel = cached
  return cached[2], cached[3]


def encode_tokens(model, tokens, batch_size: int = 64, max_length: int = 512, pooling: str = "mean",
                  normalize: bool = True, causal: bool = False, with_cache: bool = False,
                  show_progress_bar: bool | None = None, devices=None):
  """Embed pre-tokenized (ids, pool_mask) pairs. Returns emb [N, D] float32 and, with `with_cache`, the per-row
  (k, v) [L, n_i, KVH, Dh] of each sequence's valid tokens (numpy).

  Each batch's rows are split over `devices` (default: every local device; params replicated on them); the
  with_cache (RAG) pass stays on one device. show_progress_bar: None = a bar from PROGRESS_MIN_TEXTS texts on."""
  if pooling not in POOLINGS:
    raise GritJaxError(f"pooling={pooling!r}: expected one of {POOLINGS}")
  if batch_size < 1 or max_length < 1:
    raise GritJaxError(f"batch_size={batch_size}, max_length={max_length}: must be >= 1")
  fn = embed_fn(model.config, bool(causal), pooling, bool(normalize), bool(with_cache))
  devices = list(devices if devices is not None else jax.local_devices())
  if with_cache or len(devices) == 1:
    params, put, row_multiple = model.params, jnp.asarray, 1
  else:
    params, rows = _data_parallel(model, devices)
    put, row_multiple = (lambda x: jax.device_put(x, rows)), len(devices)
  emb = np.zeros((len(tokens), model.config.hidden_size), np.float32)
  caches = [None] * len(tokens)
  if show_progress_bar is None:
    show_progress_bar = len(tokens) >= PROGRESS_MIN_TEXTS
  from tqdm import tqdm
  for idx, ids, mask, pool in tqdm(batches(tokens, batch_size, max_length, model.config.bos_token_id, row_multiple),
                                   total=-(-len(tokens) // batch_size), desc="Batches", disable=not show_progress_bar):
    e, cache = fn(params, put(ids), put(mask), put(pool))
    emb[idx] = np.asarray(e)[:len(idx)]
    if with_cache:
      from grit_jax.inference.generate import unstack_cache
      for i, kv in zip(idx, unstack_cache(cache)):
        caches[i] = kv
  return (emb, caches) if with_cache else emb

