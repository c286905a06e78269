"""The collectives of a compiled program, read from its HLO text: what each moves per chip, how often it runs, and
whether it crosses slices (the data-center network).

- How often: a collective inside a while loop (a scanned layer stack, a collective-matmul loop) runs once per
  iteration. The trip count is the bound the loop's condition compares its counter with, over the step the body
  adds to it (counters start at 0); the call graph multiplies it through nested loops and fusions. A loop whose
  count cannot be read is counted once and reported.
- Bytes received per chip per run, for a group of n devices and a result of R bytes (ring algorithms, the usual
  estimate): all-gather R(n-1)/n, reduce-scatter R(n-1), all-reduce 2R(n-1)/n, all-to-all R(n-1)/n,
  collective-permute R.
- Within a slice, the TPU compiler writes a reduce-scatter as an all-reduce inside an `all-reduce-scatter` fusion
  (it runs as a reduce-scatter): counted as one.
- Across slices (multislice), a program's device ids name the chips of one slice; what crosses the data-center
  network is a `send` to the megascale runtime whose attributes name the collective (ALL_REDUCE, ...), over the
  slices.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_OP_RE = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s(" + "|".join(KINDS) + r")(-start)?\(")
_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")
_CALLEE_RE = re.compile(r"\b(calls|to_apply|body|condition)=%([^\s,}]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
_DCN_RE = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\ssend\(.*_xla_megascale_transfer_type=\"([A-Z_]+)\"")
_FACTORS = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
            "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
            "collective-permute": lambda n: 1.0}  # x the bytes of the larger side (input of a reduce-scatter)


@dataclasses.dataclass
class Collective:
  kind: str
  result: str                 # the HLO result type, layouts dropped
  group_size: int
  runs: float                 # executions per program run (loop trip counts multiplied out)
  bytes_per_run: float        # received per chip per execution
  cross_slice: bool           # over the data-center network (between slices)
  op_name: str                # jax's name of the op that produced it (metadata)

  @property
  def bytes_per_chip(self) -> float:
    return self.runs * self.bytes_per_run


def _array_bytes(type_text: str, start: bool) -> float:
  arrays = [(dt, dims) for dt, dims in _ARRAY_RE.findall(type_text) if dt in _BYTES or dt.startswith("f8")]
  if start:  # async start: (operands..., results..., scalar sync flags): keep the results
    arrays = [a for a in arrays if a[1]]
    arrays = arrays[len(arrays) // 2:]
  return sum(_BYTES.get(dt, 1) * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in arrays)


def _groups(line: str, num_devices: int) -> list[list[int]] | None:
  """Device groups of a collective (None = not understood)."""
  if "source_target_pairs=" in line:
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    pairs = re.findall(r"\{(\d+),(\d+)\}", (m.group(1) + "}") if m else "")
    return [[int(a), int(b)] for a, b in pairs] or None
  m = re.search(r"replica_groups=(\S+)", line)
  if not m or line[m.start(1):].startswith("{}"):
    return [list(range(num_devices))]  # every device of the program
  spec = line[m.start(1):]
  if spec.startswith("{{"):
    body = spec[2:spec.index("}}")]
    return [[int(x) for x in g.split(",") if x] for g in body.split("},{")]
  iota = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
  if iota:
    shape = [int(x) for x in iota.group(1).split(",")]
    dims = [int(x) for x in iota.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota.group(3):
      ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
    return ids.reshape(shape[0], -1).tolist()
  mesh = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", spec)
  if mesh:  # mesh['axis_0'=a,'axis_1'=b][, device_ids=([b,a]T(1,0))] {'axis_1'}: a group varies the listed axes
    names, sizes = zip(*((n.strip("'"), int(s)) for n, s in (p.split("=") for p in mesh.group(1).split(","))))
    inner = [n.strip().strip("'") for n in mesh.group(3).split(",")]
    ids = np.arange(math.prod(sizes))
    order = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", mesh.group(2) or "")
    if order:  # the devices in mesh order, as an iota reshaped and transposed
      ids = ids.reshape([int(x) for x in order.group(1).split(",")])
      if order.group(2):
        ids = ids.transpose([int(x) for x in order.group(2).split(",")])
    elif mesh.group(2):
      ids = np.asarray([int(x) for x in mesh.group(2).split(",")])
    ids = ids.reshape(sizes)
    order = [i for i, n in enumerate(names) if n not in inner] + [names.index(n) for n in inner]
    group = math.prod(sizes[names.index(n)] for n in inner)
    return ids.transpose(order).reshape(-1, group).tolist()
  return None


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  comps, name, entry = {}, None, ""
  for line in hlo_text.splitlines():
    m = _COMP_RE.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif line.rstrip() == "}":  # (a kernel's multi-line backend config can start a line with "}}")
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def _trip_count(cond_lines: list[str], body_lines: list[str]) -> int | None:
  """Iterations of a counted loop: the condition compares tuple element i with constant N (direction LT), the body
  adds a constant step to element i (XLA unrolls some loops: step 2); jax's counters start at 0."""
  const = r"[su](?:32|64)\[\]\S*\s+constant\((\d+)\)"
  bounds = [int(c) for line in cond_lines for c in re.findall(const, line)]
  index = [m for line in cond_lines for m in re.findall(r"get-tuple-element\([^)]*\), index=(\d+)", line)]
  if len(bounds) != 1 or len(set(index)) != 1 or not any("direction=LT" in line for line in cond_lines):
    return None
  names = {}  # value name -> its line
  for line in body_lines:
    m = re.match(r"\s*(?:ROOT\s+)?%(\S+)\s*=", line)
    if m:
      names[m.group(1)] = line
  counters = {n for n, line in names.items() if re.search(r"get-tuple-element\([^)]*\), index=" + index[0] + r"\b", line)}
  root = next((line for line in body_lines if line.lstrip().startswith("ROOT") and " tuple(" in line), "")
  operands = re.findall(r"%([^\s,()]+)", root.split(" tuple(", 1)[-1]) if root else []
  nxt = names.get(operands[int(index[0])], "") if len(operands) > int(index[0]) else ""
  add = re.search(r"\sadd\(%(\S+?), %(\S+?)\)", nxt)  # next counter = counter + step
  if add and len(counters & set(add.groups())) == 1:
    step = re.findall(const, names.get((set(add.groups()) - counters).pop(), ""))
    if step and int(step[0]) > 0:
      return -(-bounds[0] // int(step[0]))
  return bounds[0]


def run_counts(hlo_text: str) -> tuple[dict[str, float], int]:
  """(executions of each computation per program run, number of while loops whose trip count was not found)."""
  comps, entry = _computations(hlo_text)
  edges: dict[str, list[tuple[str, float]]] = {n: [] for n in comps}
  unknown = 0
  for name, lines in comps.items():
    for line in lines:
      callees = dict(_CALLEE_RE.findall(line))
      trips = 1.0
      if " while(" in line and "body" in callees:
        t = _trip_count(comps.get(callees.get("condition", ""), []), comps.get(callees["body"], []))
        unknown += t is None
        trips = float(t or 1)
      for kind, callee in _CALLEE_RE.findall(line):
        if kind != "to_apply":  # reductions' scalar computations run inside the op, not as programs
          edges[name].append((callee, trips if kind in ("body", "condition") else 1.0))
      for branches in _BRANCHES_RE.findall(line):
        edges[name] += [(b.strip().lstrip("%"), 1.0) for b in branches.split(",") if b.strip()]
  counts: dict[str, float] = {}

  def visit(name, mult):
    counts[name] = counts.get(name, 0.0) + mult
    for callee, trips in edges.get(name, ()):
      visit(callee, mult * trips)

  visit(entry, 1.0)
  return counts, unknown


def collectives(hlo_text: str, num_slices: int = 1) -> tuple[list[Collective], int]:
  """(every collective of the compiled program, while loops of unknown trip count counted once)."""
  comps, _ = _computations(hlo_text)
  counts, unknown = run_counts(hlo_text)
  out = []
  for name, lines in comps.items():
    runs = counts.get(name, 0.0)
    if not runs:
      continue
    for line in lines:
      op_name = _OP_NAME_RE.search(line)
      op_name = op_name.group(1) if op_name else ""
      dcn = _DCN_RE.match(line)
      if dcn:
        kind = dcn.group(3).lower().replace("_", "-")
        size = _array_bytes(dcn.group(2).split("u32[]")[0], False)  # (data, u32[] context, token[])
        out.append(Collective(kind, _plain(dcn.group(2)), num_slices, runs,
                              size * _FACTORS.get(kind, _FACTORS["all-to-all"])(num_slices), True, op_name))
        continue
      m = _OP_RE.match(line)
      if not m:
        continue
      kind, start = m.group(3), bool(m.group(4))
      size = _array_bytes(m.group(2), start)
      groups = _groups(line, 0)
      if groups is None:
        raise ValueError(f"cannot read the device groups of: {line.strip()[:200]}")
      if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"  # the fusion's result is this all-reduce's 1/n slice
      if kind == "collective-permute":
        n, per_run = len(groups), size
      else:
        n = max(len(g) for g in groups) if groups[0] else _partitions(hlo_text)
        per_run = size * (n - 1 if (kind == "reduce-scatter" and not name.startswith("all-reduce-scatter"))
                          else _FACTORS[kind](n))
      out.append(Collective(kind, _plain(m.group(2)), n, runs, per_run, False, op_name))
  return out, unknown


def _plain(type_text: str) -> str:
  return re.sub(r"\{[^{}]*\}", "", type_text)


def _partitions(hlo_text: str) -> int:
  m = re.search(r"num_partitions=(\d+)", hlo_text[:2000])
  return int(m.group(1)) if m else 1


def summarize(colls: list[Collective]) -> dict[str, dict[str, float]]:
  """kind -> {ops (static), runs, bytes (received per chip per step), cross_slice_bytes}."""
  table = {k: dict(ops=0, runs=0.0, bytes=0.0, cross_slice_ops=0, cross_slice_bytes=0.0) for k in KINDS}
  for c in colls:
    row = table[c.kind]
    row["ops"] += 1
    row["runs"] += c.runs
    row["bytes"] += c.bytes_per_chip
    if c.cross_slice:
      row["cross_slice_ops"] += 1
      row["cross_slice_bytes"] += c.bytes_per_chip
  return table
