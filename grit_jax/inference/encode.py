"""Embeddings: GritLM template, one bidirectional (or causal, for `cc` models) pass, pooling over the text tokens.

Two layouts of the same computation (equal to 1e-5 in float32; `packing=` chooses, default: packed where it pays):
- packed (the training layout, grit_jax.data.packing): whole texts packed best-fit-decreasing into rows of a fixed
  length L, with segment ids (attention only inside a text) and positions restarting at 0 per text, each text pooled
  on its own tokens (objectives.pool_packed). A call is U rows (packing units of one row) of L tokens holding at
  most n texts each; L and n are fixed for a corpus (from its longest and its short texts), U is cut so the calls
  are nearly equal (in eighths of batch_size: at most 8 shapes), the last call padded with empty rows. By default
  (`choose_row_len`) the texts up to a row length L are packed and longer ones padded, with the L (or all padded)
  that costs the fewest model FLOPs: packing saves the padding's matmuls but attends over whole rows. With KV
  caches (the RAG index), each text's keys/values are the slots of its row it fills.
- padded: texts sorted by token length and cut into batches; each batch is padded to a length bucket (a power of
  two, at least 16, capped at max_length) and a row bucket (a power of two, capped at batch_size), so the number of
  compiled programs stays at about log2(max_length) x log2(batch_size) whatever the inputs.
Output order is the input order. Both split the rows over every local device (inference.placement), with the weights
replicated, or sharded (FSDP, the training mesh rules) when they do not fit one device.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grit_jax import common_types as ct
from grit_jax import objectives
from grit_jax.common_types import POOLINGS
from grit_jax.data import packing as packing_lib
from grit_jax.errors import GritJaxError
from grit_jax.inference.generate import _count_trace, bucket
from grit_jax.inference.placement import generation_params, placement
from grit_jax.modeling.model import KVCache, Transformer, embed_packed


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
  """(ids, pool_mask) per text through the GritLM embedding template (data.templates); each an Encoded whose
  `.truncated` says the text was cut to max_length."""
  from grit_jax.data import templates
  if model.grit_tokenizer is None:
    raise GritJaxError("encode needs a tokenizer (tokenizer.model next to the weights)")
  out = []
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise GritJaxError(f"texts[{i}] is {type(t).__name__}, expected str")
    try:
      t.encode("utf-8")
    except UnicodeEncodeError:
      raise GritJaxError(f"texts[{i}]: a lone UTF-16 surrogate in the text: not valid Unicode") from None
    try:
      enc = templates.encode_embedding(model.grit_tokenizer, instruction, t, max_length)
    except GritJaxError as e:
      raise GritJaxError(f"texts[{i}]: {e}") from e
    out.append(templates.Encoded(np.asarray(enc[0], np.int32), np.asarray(enc[1], np.int32), enc.truncated))
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
PACK_IF_CHEAPER = 0.9  # packing=None: pack when that costs under this share of the padded layout's FLOPs
PACK_MIN_ROW_LEN = 256  # packed rows hold several texts: at least this long (capped at max_length)


@functools.lru_cache(maxsize=None)
def packed_embed_fn(config, causal: bool, pooling: str, normalize: bool, num_per_unit: int, with_cache: bool = False):
  """jit(params, ids, segment_ids, positions, pool_mask: [U, R, L] each) -> (emb [U, n, D] float32: text u*n+i of
  the call (segment id u*n+i+1) at [u, i], empty slots 0; with `with_cache` the KVCache [U*R rows, L slots] of the
  same pass, each text's keys/values where its tokens sit). The packed pass of training (modeling.model.embed_packed)
  plus normalisation."""
  module = Transformer(config)

  def fn(params, ids_URL, seg_URL, pos_URL, pool_URL):
    _count_trace("embed_packed_cache" if with_cache else "embed_packed")
    U, R, L = ids_URL.shape
    cache = KVCache.init(config, U * R, L, jnp.dtype(config.dtype)) if with_cache else None
    emb_UND, cache = embed_packed(module, {"params": params}, ids_URL, seg_URL, pos_URL, pool_URL,
                                  num_per_unit=num_per_unit, causal=causal, pooling=pooling, cache=cache)
    return (objectives.l2_normalize(emb_UND) if normalize else emb_UND), cache

  return jax.jit(fn)


@dataclasses.dataclass(frozen=True)
class PackedLayout:
  """The fixed shape of every packed call of a corpus: `units` x `rows` x `row_len` tokens, <= `per_unit` texts
  per unit (units a multiple of the devices the rows are split over)."""
  units: int
  rows: int
  row_len: int
  per_unit: int

  @property
  def slots(self) -> int:
    return self.units * self.rows * self.row_len


def padded_shapes(lengths: Sequence[int], batch_size: int, max_length: int,
                  row_multiple: int = 1) -> list[tuple[int, int]]:
  """(rows, length) of each batch of the padded layout (`batches`) for these lengths."""
  desc = sorted(lengths, reverse=True)
  return [(-(-bucket(len(desc[s:s + batch_size]), cap=batch_size, minimum=1) // row_multiple) * row_multiple,
           bucket(desc[s], cap=max_length)) for s in range(0, len(desc), batch_size)]


def padded_efficiency(lengths: Sequence[int], batch_size: int, max_length: int, row_multiple: int = 1) -> float:
  """Text tokens / token slots of the padded layout."""
  return sum(lengths) / max(1, sum(r * t for r, t in padded_shapes(lengths, batch_size, max_length, row_multiple)))


def plan_packed(lengths: Sequence[int], batch_size: int, row_len: int,
                num_devices: int = 1) -> tuple[PackedLayout, list[list[int]]]:
  """(the call layout, the texts of each unit) of the packed layout with rows of `row_len` tokens."""
  layout = packed_layout(lengths, batch_size, row_len, num_devices)
  units = packed_units(lengths, layout)
  return balanced_calls(layout, len(units), num_devices), units


def packed_row_len(lengths: Sequence[int], max_length: int) -> int:
  """The row length that holds every text: the longest one's bucket, at least PACK_MIN_ROW_LEN (capped at
  max_length)."""
  return max(bucket(int(max(lengths)), cap=max_length), min(PACK_MIN_ROW_LEN, max_length))


def layout_flops(config, shapes: Sequence[tuple[int, int]]) -> float:
  """Model FLOPs of forward passes over these (rows, length) shapes, with every key of a row computed (the XLA
  attention of both layouts), grit_jax.flops.forward_flops."""
  from grit_jax import flops
  return sum(flops.forward_flops(config, rows, length, causal=False, lm_head=False) for rows, length in shapes)


def choose_row_len(config, lengths: Sequence[int], batch_size: int, max_length: int,
                   num_devices: int = 1) -> int | None:
  """packing=None: the row length L (PACK_MIN_ROW_LEN, doubling up to `packed_row_len`) whose layout (texts of up
  to L tokens packed in rows of L, longer ones in padded batches) costs the fewest model FLOPs, or None (all padded)
  unless that is under PACK_IF_CHEAPER of the all-padded FLOPs. Packing saves the padding's matmuls but attends
  over whole rows, so long rows pay only where the matmuls dominate (real models, not a tiny one)."""
  lengths = np.asarray(lengths, np.int64)
  padded = lambda ls: layout_flops(config, padded_shapes(ls, batch_size, max_length, num_devices))
  best, best_cost = None, PACK_IF_CHEAPER * padded(lengths)
  top, row_len = packed_row_len(lengths, max_length), min(PACK_MIN_ROW_LEN, max_length)
  while True:
    short = lengths[lengths <= row_len]
    if short.size:
      layout, units = plan_packed(short, batch_size, row_len, num_devices)
      cost = layout_flops(config, [(layout.units, row_len)] * -(-len(units) // layout.units)) + \
          padded(lengths[lengths > row_len])
      if cost < best_cost:
        best, best_cost = row_len, cost
    if row_len >= top:
      return best
    row_len = min(2 * row_len, top)


def packed_layout(lengths: Sequence[int], batch_size: int, row_len: int, num_devices: int = 1) -> PackedLayout:
  """Rows of L = row_len tokens, one packing unit per row (so a unit's pooling matrix [n, L] stays small and filling
  a unit is filling a row); a call holds up to batch_size rows (the padded layout's largest batch in slots at
  length L: the same memory), a multiple of `num_devices`; n = the texts of the 5th-percentile length a row holds
  (a power of two)."""
  lengths = np.asarray(lengths, np.int64)
  L = row_len
  units = -(-batch_size // num_devices) * num_devices
  per_unit = bucket(-(-L // max(1, int(np.percentile(lengths, 5)))), cap=L, minimum=1)
  return PackedLayout(units, 1, L, per_unit)


def balanced_calls(layout: PackedLayout, num_units: int, num_devices: int = 1) -> PackedLayout:
  """The layout with `units` per call cut so that `num_units` units split into the fewest calls of nearly equal
  size (the last call no longer mostly empty), rounded up to an eighth of the largest call (and to the devices):
  at most 8 call shapes per row layout, whatever the corpus size."""
  calls = max(1, -(-num_units // layout.units))
  step = -(-max(1, layout.units // 8) // num_devices) * num_devices
  return dataclasses.replace(layout, units=min(layout.units, -(-(-(-num_units // calls)) // step) * step))


def packed_units(lengths: Sequence[int], layout: PackedLayout) -> list[list[int]]:
  """The texts (indices) of each unit, in order: a unit takes the longest remaining text that still fits its free
  tokens, until it has n texts or nothing fits (largest first, gaps filled by the longest text that fits them: best
  fit decreasing), and hands back its last texts while packing.pack_plan cannot place them in its rows (never with
  one row per unit). Every text lands in exactly one unit."""
  by_length = [collections.deque() for _ in range(layout.row_len + 1)]
  for i, n in enumerate(lengths):
    by_length[n].append(i)
  count = np.array([len(q) for q in by_length])
  capacity, units = layout.rows * layout.row_len, []
  while count.any():
    unit, free = [], capacity
    while len(unit) < layout.per_unit:
      fits = np.flatnonzero(count[:min(free, layout.row_len) + 1])
      if not fits.size:
        break
      n = int(fits[-1])
      unit.append(by_length[n].popleft())
      count[n] -= 1
      free -= n
    while packing_lib.pack_plan([lengths[i] for i in unit], 1, layout.rows, layout.row_len) is None:
      i = unit.pop()
      by_length[lengths[i]].appendleft(i)
      count[lengths[i]] += 1
    units.append(unit)
  return units


def packed_calls(tokens, layout: PackedLayout,
                 units: list[list[int]]) -> Iterator[tuple[list[list[int]], dict[str, np.ndarray]]]:
  """(texts of each unit, arrays ids / pool_mask / segment_ids / positions [U, R, L]) per call of `layout.units` of
  the `units` (packed_units); the last call's missing units are empty (segment 0: never attended, never pooled)."""
  lengths = [len(ids) for ids, _ in tokens]
  for c in range(0, len(units), layout.units):
    call = units[c:c + layout.units]
    parts = []
    for u in range(layout.units):
      idx = call[u] if u < len(call) else []
      seqs = [{ct.IDS: tokens[i][0], ct.POOL_MASK: tokens[i][1]} for i in idx]
      plan = packing_lib.pack_plan([lengths[i] for i in idx], 1, layout.rows, layout.row_len)
      parts.append(packing_lib.pack_sequences(seqs, plan, 1, layout.rows, layout.row_len,
                                              {ct.IDS: 0, ct.POOL_MASK: 0}, prefix="", first_index=u * layout.per_unit))
    yield call, {k: np.concatenate([p[k] for p in parts]) for k in ct.packed_fields(ct.QUERY)}


def encode_tokens(model, tokens, batch_size: int = 64, max_length: int = 512, pooling: str = "mean",
                  normalize: bool = True, causal: bool = False, with_cache: bool = False,
                  show_progress_bar: bool | None = None, devices=None, packing: bool | None = None,
                  desc: str = "Batches"):
  """Embed pre-tokenized (ids, pool_mask) pairs. Returns emb [N, D] float32 and, with `with_cache`, the per-row
  (k, v) [L, n_i, KVH, Dh] of each sequence's valid tokens (numpy).

  packing: True = every text in packed rows, False = padded batches, None = `choose_row_len` (texts up to its row
  length packed, longer ones padded; or all padded). Rows are split over `devices`
  (default: every local device), params placed by `placement` (sharded when they do not fit one device); the
  with_cache (RAG) pass keeps its rows on one device. show_progress_bar: None = a bar from
  PROGRESS_MIN_TEXTS texts on; `desc` is its label."""
  if pooling not in POOLINGS:
    raise GritJaxError(f"pooling={pooling!r}: expected one of {POOLINGS}")
  if batch_size < 1 or max_length < 1:
    raise GritJaxError(f"batch_size={batch_size}, max_length={max_length}: must be >= 1")
  devices = list(devices if devices is not None else jax.local_devices())
  if with_cache:  # one device for the rows (the caches are per row); the weights sharded if they must be
    devices, (params, rows) = devices[:1], (generation_params(model), None)
  else:
    params, rows = placement(model, devices)
  put = jnp.asarray if rows is None else (lambda x: jax.device_put(x, rows))
  emb = np.zeros((len(tokens), model.config.hidden_size), np.float32)
  if show_progress_bar is None:
    show_progress_bar = len(tokens) >= PROGRESS_MIN_TEXTS
  from tqdm import tqdm
  if not tokens:
    return (emb, []) if with_cache else emb
  lengths = [len(ids) for ids, _ in tokens]
  if packing is None:
    row_len = choose_row_len(model.config, lengths, batch_size, max_length, len(devices))
  else:
    row_len = packed_row_len(lengths, max_length) if packing else None
  if row_len is not None:
    short = [i for i, n in enumerate(lengths) if n <= row_len]
    rest = [i for i, n in enumerate(lengths) if n > row_len]
    caches = [None] * len(tokens)
    if rest:  # longer than the rows (packing=None only): padded batches
      out = encode_tokens(model, [tokens[i] for i in rest], batch_size, max_length, pooling, normalize, causal,
                          with_cache, show_progress_bar, devices, packing=False, desc=desc)
      emb[rest] = out[0] if with_cache else out
      for i, kv in zip(rest, out[1] if with_cache else ()):
        caches[i] = kv
    tokens = [tokens[i] for i in short]
    layout, units = plan_packed([len(ids) for ids, _ in tokens], batch_size, row_len, len(devices))
    fn = packed_embed_fn(model.config, bool(causal), pooling, bool(normalize), layout.per_unit, bool(with_cache))
    for call, arrays in tqdm(packed_calls(tokens, layout, units), total=-(-len(units) // layout.units),
                             desc=desc, disable=not show_progress_bar):
      e_UND, cache = fn(params, *(put(arrays[k]) for k in ct.packed_fields(ct.QUERY)))
      e_UND = np.asarray(e_UND)
      if with_cache:  # each text's slots of its row (one row per unit)
        k, v, seg = np.asarray(cache.k), np.asarray(cache.v), arrays[ct.SEGMENT_IDS][:, 0]
      for u, idx in enumerate(call):
        emb[[short[i] for i in idx]] = e_UND[u, :len(idx)]
        for j, i in enumerate(idx if with_cache else ()):
          slots = seg[u] == u * layout.per_unit + j + 1
          caches[short[i]] = (k[:, u, slots], v[:, u, slots])
    return (emb, caches) if with_cache else emb
  fn = embed_fn(model.config, bool(causal), pooling, bool(normalize), bool(with_cache))
  caches = [None] * len(tokens)
  for idx, ids, mask, pool in tqdm(batches(tokens, batch_size, max_length, model.config.bos_token_id, len(devices)),
                                   total=-(-len(tokens) // batch_size), desc=desc, disable=not show_progress_bar):
    e, cache = fn(params, put(ids), put(mask), put(pool))
    emb[idx] = np.asarray(e)[:len(idx)]
    if with_cache:
      from grit_jax.inference.generate import unstack_cache
      for i, kv in zip(idx, unstack_cache(cache)):
        caches[i] = kv
  return (emb, caches) if with_cache else emb
