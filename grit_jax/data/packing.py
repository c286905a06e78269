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
- Shapes come from a fixed *ladder* of levels, chosen when the iterator is built; a level gives every packed pass
  its (R, L). Each step takes the cheapest level (fewest token slots over all its packed passes) at which every
  unit of every packed pass fits, so a run compiles at most `pack_levels` + 1 step shapes, each on first use:
  - the packed levels (config.data.pack_levels of them) are derived from the data: the sequences of up to
    `STAT_EXAMPLES` examples (sampler order, tokenized as in training) are drawn into `STAT_BATCHES` global batches
    of the step's size, and for each pass and row length L (its pack length, and the shorter multiples of LANES up
    to BLOCK and of BLOCK above, which hold steps whose sequences all fit them) the rows R a batch needs (the most
    any unit needs, rounded up to the GradCache chunks / micro-batches). The top level holds every sampled batch
    at the pack lengths: the most rows needed times 1 + config.data.pack_headroom (at most one sequence per row);
    its full-length rows also hold a batch with a sequence longer than any sampled. The others are added greedily,
    each the combination of the passes' (R, L) that lowers the sampled batches' mean token slots most, then each
    re-chosen given the others, while a level saves at least MIN_SAVING of them.
    A pass whose rows are set (config.data.{query,passage,generative}_pack_rows) takes those rows at its pack
    length at every packed level.
  - the fallback: n rows per unit at the pack length (one sequence per row, which always fits), for a batch that
    fits no packed level. Nothing is cut or deferred.
  The packer counts the steps at each level (`report`, the run's `pack_level` metric and summary).
Multi-process: every process packs all U units (the same plan everywhere, so all agree on the shape) from the lengths
of the whole global batch, and keeps its own units.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np

from grit_jax import common_types as ct
from grit_jax.errors import GritJaxError

STAT_BATCHES = 256     # sampled global batches the levels are derived from
STAT_EXAMPLES = 4096   # examples (sampler order) whose lengths they are drawn from
LANES, BLOCK = 128, 512  # the shorter row lengths a level may take: multiples of LANES up to BLOCK, then of BLOCK
MIN_SAVING = 0.002       # a derived level must save this fraction of the mean token slots (it costs a compile)
MAX_OPTIONS = 24         # (rows, row length) candidates per pass, so the passes' combinations stay few


def fit_decreasing(lengths_MN, row_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """First-fit decreasing of M independent sets of n sequences (each <= row_len) into rows of `row_len` tokens, a row
  opened when no open one has room, ties in set order. Returns each sequence's row and start column [M, n] and the
  rows each set used [M]. Given R rows up front, first fit places every sequence the same way: it fits iff used <= R."""
  lengths_MN = np.asarray(lengths_MN, np.int64)
  M, n = lengths_MN.shape
  # first fit leaves at most one row at most half full: it never opens more than 2 * tokens / row_len + 1 rows
  max_rows = max(1, min(n, 2 * int(lengths_MN.sum(1).max(initial=0)) // row_len + 1))
  free_MR = np.full([M, max_rows], row_len, np.int64)  # tokens left per row
  row_MN, start_MN = np.zeros([M, n], np.int64), np.zeros([M, n], np.int64)
  order_MN = np.argsort(-lengths_MN, axis=1, kind="stable")
  m = np.arange(M)
  for j in range(n):
    i = order_MN[:, j]
    size = lengths_MN[m, i]
    r = np.argmax(free_MR >= size[:, None], axis=1)  # the first row with room
    row_MN[m, i], start_MN[m, i] = r, row_len - free_MR[m, r]
    free_MR[m, r] -= size
  return row_MN, start_MN, (free_MR < row_len).sum(1)


def _check(lengths: np.ndarray, units: int, row_len: int) -> None:
  if lengths.size % units:
    raise GritJaxError(f"packing: {lengths.size} sequences do not split into {units} units")
  if lengths.size and (lengths.min() < 1 or lengths.max() > row_len):
    raise GritJaxError(f"packing: sequence lengths {lengths.min()}..{lengths.max()} do not fit rows of {row_len}")


def pack_plan(lengths: Sequence[int], units: int, rows: int, row_len: int) -> np.ndarray | None:
  """Places every sequence into the rows of its unit ([N, 2]: row within the unit, start column), or None when some
  unit's sequences do not fit in `rows` rows of `row_len` tokens (first-fit decreasing, ties in batch order)."""
  lengths = np.asarray(lengths, np.int64)
  _check(lengths, units, row_len)
  if not lengths.size:
    return np.zeros([0, 2], np.int64)
  row, start, used = fit_decreasing(lengths.reshape(units, -1), row_len)
  if used.max() > rows:
    return None
  return np.stack([row.reshape(-1), start.reshape(-1)], axis=1)


def rows_needed(lengths: Sequence[int], units: int, row_len: int) -> int:
  """The fewest rows per unit that `pack_plan` fits these sequences into."""
  lengths = np.asarray(lengths, np.int64)
  _check(lengths, units, row_len)
  return max(1, int(fit_decreasing(lengths.reshape(units, -1), row_len)[2].max(initial=0)))


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
  out.update({prefix + ct.SEGMENT_IDS: seg, prefix + ct.POSITIONS: pos, prefix + ct.LENGTHS: lengths})
  return out


# -- the ladder of step shapes ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class PassSpec:
  """What the iterator knows of one packed pass when the levels are derived."""
  units: int          # U, global
  num_sequences: int  # N per step
  pack_len: int       # the longest row length (>= the pass's max length): the top level's and the fallback's
  rows: int           # rows per unit set in config (0 = derived)
  chunks: int         # rows per unit divide into these (GradCache chunks / generative micro-batches)


@dataclasses.dataclass
class PassLayout:
  """The fixed shapes of one packed pass: (rows per unit, row length) at each level, cheapest step first, the last
  the fallback; `use`: the fraction of the sampled batches that took each level."""
  name: str           # query | passage | gen
  units: int          # U, global
  per_unit: int       # n sequences per unit
  shapes: list[tuple[int, int]]
  use: list[float]
  derived: bool       # rows derived from the data (else set in config)
  mean_tokens: float  # text tokens per step of the pass on the data (the sampled batches' mean)

  @property
  def primary(self) -> int:
    """The level most sampled batches took (the shape `grit-jax aot` compiles and FLOP counts assume)."""
    return int(np.argmax(self.use))

  @property
  def rows(self) -> int:
    return self.shapes[self.primary][0]

  @property
  def row_len(self) -> int:
    return self.shapes[self.primary][1]

  @property
  def fallback_rows(self) -> int:
    return self.shapes[-1][0]

  @property
  def slots(self) -> int:
    return self.units * self.rows * self.row_len

  @property
  def expected_efficiency(self) -> float:
    """Text tokens / token slots over the sampled batches, each at its level."""
    return self.mean_tokens / sum(f * self.units * r * length for f, (r, length) in zip(self.use, self.shapes))

  def describe(self) -> str:
    how = "derived from the data" if self.derived else "set in config"
    levels = " | ".join(f"{r}x{length} ({f:.0%})" for (r, length), f in zip(self.shapes[:-1], self.use))
    return (f"{self.name}: {self.units} units of {self.per_unit} sequences; rows x tokens per unit (share of sampled "
            f"steps) {levels} | fallback {self.shapes[-1][0]}x{self.shapes[-1][1]} ({self.use[-1]:.0%}); expected "
            f"efficiency {self.expected_efficiency:.1%} (rows {how})")


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def sample_batches(pools: dict[str, Sequence[np.ndarray]], examples: int, seed: int = 0) -> dict[str, np.ndarray]:
  """{pass: [STAT_BATCHES, sequences per step]} token lengths of sampled global batches of `examples` examples of one
  stream. pools: {pass: per pool, [examples in the pool, sequences per example] (or [examples])}: the passes of one
  stream share their examples; a batch draws all its examples from one pool (a dataset, when batches come from one
  dataset each), picked in proportion to its size."""
  sizes = np.array([len(p) for p in next(iter(pools.values()))], np.float64)
  if not sizes.sum():
    raise GritJaxError(f"packing: no data to derive the {'/'.join(pools)} rows from")
  rng = np.random.default_rng([seed, int(sizes.sum()), examples])
  out = {name: [] for name in pools}
  for d in rng.choice(len(sizes), STAT_BATCHES, p=sizes / sizes.sum()):
    idx = rng.choice(int(sizes[d]), examples, replace=sizes[d] < examples)  # as the sampler, when the pool holds a batch
    for name, pool in pools.items():
      out[name].append(np.asarray(pool[d])[idx].reshape(-1))
  return {name: np.stack(v) for name, v in out.items()}


def _options(spec: PassSpec, lengths_SN: np.ndarray, headroom: float):
  """A pass's candidate (rows, row length) per level, what they cost ([o] token slots) and which sampled batches
  they hold ([o, S]); option 0 is the top level's (the most rows needed at the pack length, with headroom)."""
  longest_S, per_unit = lengths_SN.max(1), spec.num_sequences // spec.units
  need = {}  # row length -> [S] rows per unit each sampled batch needs (inf: a sequence is longer)
  row_lens = [spec.pack_len] + ([n for n in range(LANES, spec.pack_len, LANES) if n <= BLOCK or n % BLOCK == 0]
                              if not spec.rows else [])
  for length in row_lens:
    fits = longest_S <= length
    units_MN = np.minimum(lengths_SN, length).reshape(-1, per_unit)
    used = fit_decreasing(units_MN, length)[2].reshape(len(lengths_SN), spec.units).max(1)
    need[length] = np.where(fits, [_round_up(int(u), spec.chunks) for u in used], np.inf)
  most = int(need[spec.pack_len].max())
  top = spec.rows or min(max(math.floor(most * (1.0 + headroom)), most), per_unit)  # never above one per row
  shapes = [(_round_up(top, spec.chunks), spec.pack_len)]
  if not spec.rows:
    shapes += [(int(r), length) for length in row_lens for r in np.unique(need[length][np.isfinite(need[length])])]
  holds = np.array([need[length] <= r for r, length in shapes])  # [o, S]
  cost = np.array([spec.units * r * length for r, length in shapes], np.float64)
  # keep the options no other one beats (holds at least the same batches for at most the same slots)
  keep = [o for o in range(len(shapes)) if o == 0 or not any(
      (cost[p] < cost[o] or (cost[p] == cost[o] and p < o)) and np.all(holds[p] >= holds[o]) for p in range(len(shapes))
      if p != o)]
  keep = keep[:1] + sorted(keep[1:], key=lambda o: cost[o])
  if len(keep) > MAX_OPTIONS:  # the top and an even spread by cost of the others
    keep = keep[:1] + [keep[1:][i] for i in np.linspace(0, len(keep) - 2, MAX_OPTIONS - 1).round().astype(int)]
  return [shapes[o] for o in keep], cost[keep], holds[keep]


def make_layouts(specs: dict[str, PassSpec], lengths: dict[str, np.ndarray], *, levels: int,
                 headroom: float) -> dict[str, PassLayout]:
  """{pass: PassLayout} of the packed passes of a step (module docstring): `levels` packed levels at most, shared by
  the passes, plus the fallback. lengths: {pass: [S, N] sampled token lengths (`sample_batches`)}."""
  for name, spec in specs.items():
    if spec.num_sequences % spec.units:
      raise GritJaxError(f"packing: the {spec.num_sequences} {name} sequences per step do not split over the "
                         f"{spec.units} batch shards of the mesh")
  names = list(specs)
  opts = {name: _options(specs[name], lengths[name], headroom) for name in names}
  # every combination of the passes' options: its slots [c] and the sampled batches it holds [c, S]
  combos = list(itertools.product(*(range(len(opts[n][0])) for n in names)))
  cost = np.array([sum(opts[n][1][o] for n, o in zip(names, c)) for c in combos])
  holds = np.array([np.logical_and.reduce([opts[n][2][o] for n, o in zip(names, c)]) for c in combos])
  fallback = sum(specs[n].units * _round_up(specs[n].num_sequences // specs[n].units, specs[n].chunks)
                 * specs[n].pack_len for n in names)
  slots_CS = np.where(holds, cost[:, None], np.inf)  # [c, S] each combination's slots, inf where it does not hold
  step_slots = lambda chosen: np.min(slots_CS[chosen], 0, initial=fallback)  # [S] at the cheapest holding level
  chosen = [0]  # the top level (each pass's option 0); then greedily the level that saves most, while one does
  while len(chosen) < levels:
    now = step_slots(chosen).mean()
    mean_with = np.minimum(step_slots(chosen)[None], slots_CS).mean(1)  # [c]
    best = int(np.argmin(mean_with))
    if mean_with[best] > now * (1 - MIN_SAVING):
      break
    chosen.append(best)
  for _ in range(len(chosen)):  # then each derived level in turn the best given the others, until none changes
    changed = False
    for i in range(1, len(chosen)):
      others = step_slots(chosen[:i] + chosen[i + 1:])
      best = int(np.argmin(np.minimum(others[None], slots_CS).mean(1)))
      if np.minimum(others, slots_CS[best]).mean() < step_slots(chosen).mean() - 1e-9:
        chosen[i], changed = best, True
    if not changed:
      break
  chosen.sort(key=lambda c: cost[c])
  level_S = np.array([next((k for k, c in enumerate(chosen) if holds[c, s]), len(chosen))
                      for s in range(holds.shape[1])])
  use = [float(np.mean(level_S == k)) for k in range(len(chosen) + 1)]
  out = {}
  for i, name in enumerate(names):
    spec, shapes = specs[name], opts[name][0]
    per_unit = spec.num_sequences // spec.units
    out[name] = PassLayout(
        name, spec.units, per_unit, [shapes[combos[c][i]] for c in chosen]
        + [(_round_up(per_unit, spec.chunks), spec.pack_len)], use, not spec.rows,
        mean_tokens=float(lengths[name].sum(1).mean()))
  return out


class StepPacker:
  """Packs all packed passes of a step at one level: the first (cheapest) of the ladder at which every unit of every
  pass fits, else the fallback (module docstring). Counts the steps at each level."""

  def __init__(self, layouts: dict[str, PassLayout], process: int = 0, num_processes: int = 1):
    self.layouts, self.process, self.num_processes = layouts, process, num_processes
    self.num_levels = len(next(iter(layouts.values())).shapes)
    self.level_steps = [0] * self.num_levels
    self.level = -1  # of the last packed step

  @property
  def steps(self) -> int:
    return sum(self.level_steps)

  @property
  def fallbacks(self) -> int:
    return self.level_steps[-1]

  def _plans(self, seqs: dict[str, list[dict]]) -> tuple[int, dict[str, np.ndarray]]:
    """(level, {pass: its plan}) of this step's global batch."""
    lengths = {name: np.array([len(s[ct.IDS]) for s in seqs[name]], np.int64) for name in self.layouts}
    for name, lay in self.layouts.items():
      _check(lengths[name], lay.units, lay.shapes[-1][1])
    placed = {}  # (pass, row length) -> (plan [N, 2], rows used per unit [U]), None: a sequence is longer
    for k in range(self.num_levels):
      plans = {}
      for name, lay in self.layouts.items():
        rows, length = lay.shapes[k]
        if (name, length) not in placed:
          placed[name, length] = None
          if lengths[name].max() <= length:
            row, start, used = fit_decreasing(lengths[name].reshape(lay.units, -1), length)
            placed[name, length] = np.stack([row.reshape(-1), start.reshape(-1)], axis=1), used
        if placed[name, length] is None or placed[name, length][1].max() > rows:
          break
        plans[name] = placed[name, length][0]
      else:
        return k, plans
    raise AssertionError("unreachable: the fallback level (one sequence per row) holds every batch")

  def pack(self, seqs: dict[str, list[dict]], pads: dict[str, dict]) -> dict[str, np.ndarray]:
    """seqs: {pass: every sequence of the global batch, in batch order} -> this process's packed arrays."""
    self.level, plans = self._plans(seqs)
    self.level_steps[self.level] += 1
    out = {}
    for name, lay in self.layouts.items():
      rows, length = lay.shapes[self.level]
      local_units = lay.units // self.num_processes
      n_local = local_units * lay.per_unit
      lo = self.process * n_local
      out.update(pack_sequences(seqs[name][lo:lo + n_local], plans[name][lo:lo + n_local], local_units, rows, length,
                                pads[name], prefix=ct.key(name, ""), first_index=lo))
    return out

  def describe(self) -> str:
    return "\n".join([f"packed {lay.describe()}" for lay in self.layouts.values()]
                     + [f"packing: at most {self.num_levels} step shapes (levels), each compiled on first use"])

  def report(self) -> str:
    used = " / ".join(str(n) for n in self.level_steps[:-1])
    return self.describe() + (f"\npacking: steps per level {used}, fallbacks {self.fallbacks} of {self.steps} "
                              "steps")
