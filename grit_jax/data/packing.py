"""Packing whole sequences into rows: the query, passage and generative passes spend their token slots on text.

Every step still holds exactly the padded step's examples (embedding_batch_size queries with their groups,
generative_batch_size samples), drawn by the same sampler; only where each sequence sits changes:
- The N sequences of a pass (in batch order) split into U contiguous *units* of n = N / U, one per device share of
  the batch (U = the input batch shards of the mesh, data x fsdp). A unit's sequences are packed first-fit-decreasing
  into its own R rows of L tokens; no sequence is split, cut or dropped, and no sequence leaves its unit, so each
  device pools exactly the sequences the loss expects on it (grit_jax.objectives.pool_packed).
- Arrays per pass (prefix query_ / passage_ / gen_): ids, pool_mask (embedding) or labels (generative), segment_ids
  (1 + the sequence's index in the pass, 0 = padding: attention segment and pooling/loss index in one), positions
  (restart at 0 per sequence), all [U, R, L]; lengths [U, n].
- Row counts are fixed: R per pass is derived when the iterator is built from the data's lengths: the sequences of
  up to `STAT_EXAMPLES` examples (sampler order, tokenized as in training) are drawn with replacement into
  `STAT_BATCHES` global batches of the step's size; R = the most rows any unit of them needed, times
  1 + config.data.pack_headroom, rounded up to the GradCache chunks / micro-batches. Or set by
  config.data.{query,passage,generative}_pack_rows.
- A batch that does not fit (some unit needs more than R rows) is not cut or deferred: that step uses the fallback
  shape, n rows per unit (one sequence per row, which always fits), for every packed pass. So a run compiles at most
  two step shapes; fallbacks are counted and reported, and the headroom keeps them rare.
Multi-process: every process packs all U units (the same plan everywhere, so all agree on the shape) from the lengths
of the whole global batch, and keeps its own units.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from grit_jax.errors import GritJaxError

STAT_BATCHES = 32
STAT_EXAMPLES = 4096
IGNORE = -100


def pack_plan(lengths: Sequence[int], units: int, rows: int, row_len: int) -> np.ndarray | None:
  """Places every sequence into the rows of its unit ([N, 2]: row within the unit, start column), or None when some
  unit's sequences do not fit in `rows` rows of `row_len` tokens (first-fit decreasing, ties in batch order)."""
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
  per_unit = np.asarray(lengths, np.int64).reshape(units, -1).sum(1)
  rows = max(1, -(-int(per_unit.max()) // row_len))
  while pack_plan(lengths, units, rows, row_len) is None:
    rows += 1
  return rows


def pack_sequences(seqs: Sequence[dict], plan: np.ndarray, units: int, rows: int, row_len: int,
                   pad: dict[str, int], prefix: str, first_index: int = 0) -> dict[str, np.ndarray]:
  """The packed arrays (module docstring) of `units` units from per-sequence 1-D int arrays with the keys of `pad`
  (e.g. ids, pool_mask) and their plan. `first_index`: the pass index of seqs[0] (a process's share)."""
  out = {f"{prefix}{k}": np.full([units, rows, row_len], v, np.int32) for k, v in pad.items()}
  seg = np.zeros([units, rows, row_len], np.int32)
  pos = np.zeros([units, rows, row_len], np.int32)
  n = len(seqs) // units
  lengths = np.zeros([units, n], np.int32)
  for i, (s, (r, c)) in enumerate(zip(seqs, plan)):
    u, size = i // n, len(s[next(iter(pad))])
    for k in pad:
      out[f"{prefix}{k}"][u, r, c:c + size] = s[k]
    seg[u, r, c:c + size] = first_index + i + 1
    pos[u, r, c:c + size] = np.arange(size)
    lengths[u, i % n] = size
  out.update({f"{prefix}segment_ids": seg, f"{prefix}positions": pos, f"{prefix}lengths": lengths})
  return out


@dataclasses.dataclass
class PassLayout:
  """The fixed shapes of one packed pass."""
  name: str          # query | passage | gen
  units: int         # U, global
  per_unit: int      # n sequences per unit
  row_len: int       # L
  rows: int          # R per unit (primary shape)
  fallback_rows: int  # per unit when a batch does not fit: one sequence per row (rounded up to the chunks)
  derived: bool      # rows derived from the data (else set in config)
  mean_tokens: float = 0.0  # text tokens per step of the pass on the data (the sampled batches' mean)

  @property
  def slots(self) -> int:
    return self.units * self.rows * self.row_len

  @property
  def expected_efficiency(self) -> float:
    return self.mean_tokens / self.slots

  def describe(self) -> str:
    how = "derived from the data" if self.derived else "set in config"
    return (f"{self.name}: {self.units} units x {self.rows} rows x {self.row_len} tokens = {self.slots} slots for "
            f"{self.units * self.per_unit} sequences, expected efficiency {self.expected_efficiency:.1%} (rows {how}; "
            f"fallback {self.fallback_rows} rows per unit)")


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def make_layout(name: str, *, num_sequences: int, units: int, row_len: int, max_len: int, rows: int,
                chunks: int, headroom: float, length_pools: Sequence[np.ndarray], seed: int = 0) -> PassLayout:
  """The layout of one pass; rows = 0: derived from `length_pools` (this pass's sequence lengths on the data; one
  pool per dataset when a batch comes from one dataset: each sampled batch draws from one pool, picked in
  proportion to its size)."""
  key = {"gen": "generative"}.get(name, name)
  if num_sequences % units:
    raise GritJaxError(f"packing: the {num_sequences} {name} sequences per step do not split over the {units} "
                       "batch shards of the mesh")
  if row_len < max_len:
    raise GritJaxError(f"config.data.{key}_pack_len={row_len} is below {key}_max_len={max_len}: a sequence of max "
                       "length would not fit a row")
  sizes = np.array([len(p) for p in length_pools], np.float64)
  if not sizes.sum():
    raise GritJaxError(f"packing: no {name} data to derive config.data.{key}_pack_rows from")
  rng = np.random.default_rng([seed, int(sizes.sum()), num_sequences])
  pools = rng.choice(len(length_pools), STAT_BATCHES, p=sizes / sizes.sum())
  batches = [rng.choice(length_pools[d], num_sequences) for d in pools]
  derived = not rows
  if derived:
    need = max(rows_needed(b, units, row_len) for b in batches)
    rows = max(need, math.floor(need * (1.0 + headroom)))  # whole rows of headroom (none below 1 / headroom)
  per_unit = num_sequences // units
  return PassLayout(name, units, per_unit, row_len, _round_up(rows, chunks), _round_up(per_unit, chunks), derived,
                    mean_tokens=float(np.mean([b.sum() for b in batches])))


class StepPacker:
  """Packs all packed passes of a step with one shape choice (primary, or fallback when any unit of any pass does
  not fit), so a run compiles at most two shapes. Counts steps and fallbacks."""

  def __init__(self, layouts: dict[str, PassLayout], process: int = 0, num_processes: int = 1):
    self.layouts, self.process, self.num_processes = layouts, process, num_processes
    self.steps = self.fallbacks = 0

  def pack(self, seqs: dict[str, list[dict]], pads: dict[str, dict]) -> dict[str, np.ndarray]:
    """seqs: {pass: every sequence of the global batch, in batch order} -> this process's packed arrays."""
    plans = {}
    for name, lay in self.layouts.items():
      plans[name] = pack_plan([len(s["ids"]) for s in seqs[name]], lay.units, lay.rows, lay.row_len)
    fallback = any(p is None for p in plans.values())
    self.steps += 1
    self.fallbacks += fallback
    out = {}
    for name, lay in self.layouts.items():
      rows = lay.fallback_rows if fallback else lay.rows
      plan = pack_plan([len(s["ids"]) for s in seqs[name]], lay.units, rows, lay.row_len) if fallback else plans[name]
      local_units = lay.units // self.num_processes
      n_local = local_units * lay.per_unit
      lo = self.process * n_local
      out.update(pack_sequences(seqs[name][lo:lo + n_local], plan[lo:lo + n_local], local_units, rows, lay.row_len,
                                pads[name], prefix=f"{name}_", first_index=lo))
    return out

  def describe(self) -> str:
    return "\n".join(f"packed {lay.describe()}" for lay in self.layouts.values())

  def report(self) -> str:
    return self.describe() + f"\npacking fallbacks: {self.fallbacks} of {self.steps} steps"
