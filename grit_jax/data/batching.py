"""Examples -> fixed-shape numpy features, batches, packing, and global jax arrays.

Every array is int32 and right-padded to the configured max length (fixed shapes: the jitted step compiles once).
Shared by the seqio tasks (grit_jax.data.tasks) and the numpy sampler (grit_jax.data.iterator), so both produce
the same features from the same record.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from grit_jax.data import templates
from grit_jax.errors import GritJaxError

IGNORE = templates.IGNORE


def pad_row(ids: Sequence[int], length: int, value: int = 0) -> np.ndarray:
  out = np.full([length], value, np.int32)  # [L]
  n = min(len(ids), length)
  out[:n] = ids[:n]
  return out


def sample_passages(rec: dict, group_size: int, rng: np.random.Generator | None) -> list[tuple[str, str]]:
  """1 positive + (group_size-1) hard negatives, as the reference: a random positive; negatives sampled without
  replacement, from the list repeated when it is shorter than needed. rng=None: first positive, first negatives
  (cycled) -- the deterministic choice used for evaluation."""
  pos = list(zip(rec["pos_instructions"], rec["pos"]))
  neg = list(zip(rec["neg_instructions"], rec["neg"]))
  n_neg = group_size - 1
  if rng is None:
    chosen = [pos[0]] + [neg[i % len(neg)] for i in range(n_neg)]
  else:
    chosen = [pos[int(rng.integers(len(pos)))]]
    if n_neg:
      pool = neg * math.ceil(n_neg / len(neg))
      chosen += [pool[int(i)] for i in rng.choice(len(pool), n_neg, replace=False)]
  return chosen


def embedding_features(tokenizer, rec: dict, *, query_max_len: int, passage_max_len: int, group_size: int,
                       rng: np.random.Generator | None) -> dict[str, np.ndarray]:
  """query_{ids,mask,pool_mask} [Lq] and passage_{ids,mask,pool_mask} [g, Lp] of one record."""
  q_ids, q_pool = templates.encode_embedding(tokenizer, rec["query_instruction"], rec["query"], query_max_len)
  out = {"query_ids": pad_row(q_ids, query_max_len, tokenizer.pad_id),
         "query_mask": pad_row([1] * len(q_ids), query_max_len),
         "query_pool_mask": pad_row(q_pool, query_max_len)}
  p_ids, p_mask, p_pool = [], [], []
  for instr, text in sample_passages(rec, group_size, rng):
    ids, pool = templates.encode_embedding(tokenizer, instr, text, passage_max_len)
    p_ids.append(pad_row(ids, passage_max_len, tokenizer.pad_id))
    p_mask.append(pad_row([1] * len(ids), passage_max_len))
    p_pool.append(pad_row(pool, passage_max_len))
  out.update(passage_ids=np.stack(p_ids), passage_mask=np.stack(p_mask), passage_pool_mask=np.stack(p_pool))
  return out


def generative_tokens(tokenizer, rec: dict, max_len: int) -> tuple[list[int], list[int]]:
  """(ids, labels) of one generative record, unpadded, at most max_len long."""
  if rec["chat"]:
    return templates.encode_chat(tokenizer, rec["turns"], max_len)
  return templates.encode_plain(tokenizer, rec["turns"][0], max_len)


def generative_features(tokenizer, rec: dict, *, generative_max_len: int) -> dict[str, np.ndarray]:
  ids, labels = generative_tokens(tokenizer, rec, generative_max_len)
  return {"gen_ids": pad_row(ids, generative_max_len, tokenizer.pad_id),
          "gen_mask": pad_row([1] * len(ids), generative_max_len),
          "gen_labels": pad_row(labels, generative_max_len, IGNORE)}


def stack_embedding(features: list[dict]) -> dict[str, np.ndarray]:
  """Per-example features -> batch: queries [B, Lq], passages [B*g, Lp] (each query's group contiguous)."""
  out = {k: np.stack([f[k] for f in features]) for k in ("query_ids", "query_mask", "query_pool_mask")}
  for k in ("passage_ids", "passage_mask", "passage_pool_mask"):
    out[k] = np.concatenate([f[k] for f in features], axis=0)  # [B*g, Lp]
  return out


def stack_generative(features: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([f[k] for f in features]) for k in ("gen_ids", "gen_mask", "gen_labels")}


class Packer:
  """Greedy in-order packing of (ids, labels) sequences into `rows` rows of `length` tokens.

  A sequence goes into the current row if it fits, else into the next row; when no row is left, `add` returns
  False and the caller offers the same sequence again in the next batch. Each sequence's first label is -100
  (BOS, or forced), so with unshifted labels no target crosses a segment boundary: the last token of a segment
  never predicts the first token of the next one.
  """

  def __init__(self, rows: int, length: int, pad_id: int):
    self.rows, self.length = rows, length
    self.ids = np.full([rows, length], pad_id, np.int32)  # [Bg, Lg]
    self.labels = np.full([rows, length], IGNORE, np.int32)  # [Bg, Lg]
    self.segment_ids = np.zeros([rows, length], np.int32)  # [Bg, Lg] 0 = padding
    self.positions = np.zeros([rows, length], np.int32)  # [Bg, Lg] restart at 0 per segment
    self.row, self.col, self.segment = 0, 0, 0

  def add(self, ids: Sequence[int], labels: Sequence[int]) -> bool:
    n = len(ids)
    if n == 0 or n > self.length:
      raise GritJaxError(f"packing: sequence of {n} tokens does not fit rows of {self.length}")
    if self.col + n > self.length:
      self.row, self.col, self.segment = self.row + 1, 0, 0
    if self.row >= self.rows:
      return False
    self.segment += 1
    sl = slice(self.col, self.col + n)
    self.ids[self.row, sl] = ids
    self.labels[self.row, sl] = labels
    self.labels[self.row, self.col] = IGNORE
    self.segment_ids[self.row, sl] = self.segment
    self.positions[self.row, sl] = np.arange(n)
    self.col += n
    return True

  def batch(self) -> dict[str, np.ndarray]:
    return {"gen_ids": self.ids, "gen_mask": (self.segment_ids > 0).astype(np.int32), "gen_labels": self.labels,
            "gen_segment_ids": self.segment_ids, "gen_positions": self.positions}


def to_global_batch(batch_np: dict, mesh, batch_axes=("data", "fsdp")) -> dict:
  """Per-process numpy batches -> global jax.Arrays sharded over `batch_axes` on the leading dim.

  Each process passes its own share (rows [p*B/P, (p+1)*B/P) of the global batch, which is what the train
  iterator yields for shard_index=p); the global leading dim is the sum over processes.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  sharding = NamedSharding(mesh, P(axes if axes else None))
  ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  out = {}
  for k, v in batch_np.items():
    v = np.asarray(v)
    rows = v.shape[0] * jax.process_count()  # every process holds an equal share
    if rows % ways:
      raise GritJaxError(f"batch {k!r}: global batch dim {rows} is not divisible by the {ways} devices of mesh axes "
                         f"{axes}; change config.data.embedding_batch_size / generative_batch_size")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Packing whole sequences into rows (fixed count per step; see docs/DESIGN.md "Packing")

def pack_plan(lengths: Sequence[int], units: int, rows: int, row_len: int) -> np.ndarray | None:
  """Places every sequence of a pass into the rows of its packing unit, or returns None when a unit's sequences do
  not fit in `rows` rows of `row_len` tokens.

  The N sequences (in batch order) split into `units` contiguous groups of N / units (a unit = one device's share of
  the batch); each group is packed first-fit-decreasing into its own `rows` rows. Only where a sequence sits
  changes: which sequences a step has, and their order in the pooled outputs, are the padded batch's.
  Returns [N, 2] int64 (row within the unit, start column).
  """
  n_total = len(lengths)
  if n_total % units:
    raise GritJaxError(f"packing: {n_total} sequences do not split into {units} units")
  n = n_total // units
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.min() < 1 or lengths.max() > row_len):
    raise GritJaxError(f"packing: sequence lengths {lengths.min()}..{lengths.max()} do not fit rows of {row_len}")
  out = np.zeros([n_total, 2], np.int64)
  for u in range(units):
    free = np.full([rows], row_len, np.int64)  # tokens left per row
    for i in sorted(range(u * n, (u + 1) * n), key=lambda i: (-lengths[i], i)):
      fits = np.flatnonzero(free >= lengths[i])
      if not fits.size:
        return None
      r = int(fits[0])
      out[i] = r, row_len - free[r]
      free[r] -= lengths[i]
  return out


def rows_needed(lengths: Sequence[int], units: int, row_len: int) -> int:
  """The fewest rows per unit that `pack_plan` fits these sequences into."""
  n = len(lengths) // units
  lo = max(1, -(-int(np.max(np.asarray(lengths).reshape(units, n).sum(1))) // row_len))
  while pack_plan(lengths, units, lo, row_len) is None:
    lo += 1
  return lo


def pack_sequences(seqs: Sequence[dict], plan: np.ndarray, units: int, rows: int, row_len: int,
                   pad: dict[str, int], prefix: str, first_index: int = 0) -> dict[str, np.ndarray]:
  """Packed arrays of one pass, from per-sequence 1-D int arrays (same keys, e.g. ids and pool_mask) and a plan.

  -> {prefix}{key} [units, rows, row_len] (padded with pad[key]), {prefix}segment_ids [units, rows, row_len]
  (1 + the sequence's index in the global pass, 0 = padding: equal ids = same sequence, so it is both the attention
  segment and the pooling/loss index), {prefix}positions (restart at 0 in every sequence) and {prefix}lengths
  [units, n] (tokens of each sequence, batch order). `first_index`: global index of seqs[0] (a process's share).
  """
  out = {f"{prefix}{k}": np.full([units, rows, row_len], v, np.int32) for k, v in pad.items()}
  seg = np.zeros([units, rows, row_len], np.int32)
  pos = np.zeros([units, rows, row_len], np.int32)
  n = len(seqs) // units
  lengths = np.zeros([units, n], np.int32)
  for i, (s, (r, c)) in enumerate(zip(seqs, plan)):
    u, L = i // n, len(next(iter(s.values())))
    for k in pad:
      out[f"{prefix}{k}"][u, r, c:c + L] = s[k]
    seg[u, r, c:c + L] = first_index + i + 1
    pos[u, r, c:c + L] = np.arange(L)
    lengths[u, i % n] = L
  out.update({f"{prefix}segment_ids": seg, f"{prefix}positions": pos, f"{prefix}lengths": lengths})
  return out
