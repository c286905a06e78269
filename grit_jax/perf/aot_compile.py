"""The compile behind `grit-jax aot` (perf/aot.py: the command and its report): the recipe's real train step
lowered over a mesh of a TPU slice's chips (`topologies`) with abstract, sharded state and batch, compiled by the
TPU compiler, and measured: per-chip memory (and whether it fits in HBM), model and executed FLOPs, the collectives
XLA inserted (`hlo`), and a roofline step time."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

from grit_jax import common_types as ct
from grit_jax.errors import GritJaxError
from grit_jax.fileio import atomic_write
from grit_jax.perf import hlo, topologies


@dataclasses.dataclass
class AotResult:
  topology: str
  num_chips: int
  fits: bool
  error: str = ""                         # why it does not fit (the compiler's RESOURCE_EXHAUSTED, or over HBM)
  argument_bytes: int = 0                 # per chip
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  hbm_bytes: int = 0
  xla_flops_per_chip: float = 0.0         # cost_analysis (loop bodies once; Pallas kernels by their estimate)
  executed_flops: float = 0.0             # per step, all chips (grit_jax.flops.executed_flops)
  kernel_flops: float = 0.0               # part of executed_flops in Pallas attention kernels
  executed_loops_once: float = 0.0        # executed_flops with each loop body counted once (cost_analysis's way)
  model_flops: float = 0.0                # per step, all chips (grit_jax.flops)
  model_flops_embedding: float = 0.0
  model_flops_generative: float = 0.0
  collectives: dict = dataclasses.field(default_factory=dict)   # kind -> static op count
  traffic: dict = dataclasses.field(default_factory=dict)       # kind -> hlo.summarize row (bytes per chip)
  cross_slice: list = dataclasses.field(default_factory=list)   # hlo.Collective crossing slices, largest first
  num_slices: int = 1
  unknown_loops: int = 0                  # while loops of unknown trip count (counted once)
  attention_kernel: str = ""              # the kernel `attention_impl` resolved to for this target
  param_count: int = 0
  compile_seconds: float = 0.0
  est_compute_s: float = 0.0
  est_comm_s: float = 0.0
  packing: list = dataclasses.field(default_factory=list)  # per packed pass: token slots, expected efficiency
  pack_levels: int = 0  # the recipe's packed step shapes (0: not packed)

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def est_step_s(self) -> float:
    return max(self.est_compute_s, self.est_comm_s)

  @property
  def est_mfu(self) -> float:
    chip = self._chip
    return self.model_flops / (self.est_step_s * self.num_chips * chip.peak_bf16_flops) if self.est_step_s else 0.0

  @property
  def _chip(self):
    return topologies.get_topology(self.topology).chip


def abstract_batch(data_cfg, sharding, layouts: dict | None = None) -> dict:
  """ShapeDtypeStructs of one global batch of the recipe (docs/DESIGN.md batch keys), sharded like the loader's;
  packed passes ({pass: PassLayout}, `packed_layouts`) as [U, R, L] rows + [U, n] lengths."""
  import jax
  import jax.numpy as jnp

  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
  layouts = layouts or {}
  batch = {}
  passes = []
  emb, gen = ct.passes(data_cfg.mode)
  if emb:
    bq, g = data_cfg.embedding_batch_size, data_cfg.train_group_size
    passes += [(ct.QUERY, bq, data_cfg.query_max_len), (ct.PASSAGE, bq * g, data_cfg.passage_max_len)]
  if gen:
    passes.append((ct.GEN, data_cfg.generative_batch_size, data_cfg.generative_max_len))
  for name, rows, length in passes:
    if name in layouts:
      lay = layouts[name]
      for field in ct.packed_fields(name):
        batch[ct.key(name, field)] = spec(lay.units, lay.rows, lay.row_len)
      batch[ct.key(name, ct.LENGTHS)] = spec(lay.units, lay.per_unit)
    else:
      for k in ct.padded_keys(name):
        batch[k] = spec(rows, length)
  if emb:  # the loader's duplicate-positive keys: the same loss program as training
    batch[ct.POS_KEY] = spec(data_cfg.embedding_batch_size, 2)
    if data_cfg.no_in_batch_negatives:  # own-group rows (teacher scores come from files aot does not read)
      batch[ct.NO_IN_BATCH_NEG] = spec(data_cfg.embedding_batch_size)
  return batch


def packed_layouts(config, mesh) -> dict:
  """{pass: PassLayout} of the recipe's packed passes on `mesh`, rows derived from the recipe's train data as the
  train iterator derives them (or set in config); {} when nothing is packed."""
  d = config.data
  kinds = [k for k, on, runs in zip(("emb", "gen"), (d.pack_embedding, d.pack_generative), ct.passes(d.mode))
           if on and runs]
  if not kinds:
    return {}
  from grit_jax.data import iterator as iterator_lib
  from grit_jax.training import step as step_lib

  small = d.copy_and_resolve_references()  # the lengths only: any batch the data holds
  with small.unlocked():
    small.pack_embedding = small.pack_generative = False
    small.embedding_batch_size = small.generative_batch_size = 1
  it = iterator_lib.TrainIterator(small)
  return it.pack_layouts(d, kinds, **step_lib.packing_layout(config, mesh))


def model_config_of(config):
  from grit_jax.modeling import ModelConfig

  return ModelConfig(**config.model.to_dict())


def abstract_step(config, model_config, mesh, rules, layouts: dict | None = None):
  """(the recipe's jitted train step, its abstract sharded TrainState, an abstract global batch) over `mesh`:
  everything `.trace(state, batch)` / `.lower(...)` needs, nothing allocated. `layouts`: the packed passes'
  shapes (`packed_layouts`)."""
  import jax

  from grit_jax.training import optimizer as opt_lib
  from grit_jax.training import state as state_lib
  from grit_jax.training import step as step_lib

  tx = opt_lib.make_optimizer(config.optimizer, config.train.steps)
  abstract, shardings = state_lib.state_shardings(model_config, tx, mesh, rules)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch = abstract_batch(config.data, step_lib.input_batch_sharding(mesh), layouts)
  return step_lib.make_train_step(model_config, config, mesh, rules, state_shardings=shardings), state, batch


def at_pack_level(layouts: dict, level: str) -> tuple[dict, str]:
  """The packed passes' layouts with `level` ("primary", "top" or an index of a packed level) as the shape compiled,
  and a line naming it. Levels are shared by the passes; "top" is the one with the most token slots."""
  if not layouts:
    if level not in ("primary", "0"):  # its one step shape is level 0
      raise GritJaxError(f"--pack_level={level}: the recipe packs no pass (config.data.pack_embedding / "
                         "pack_generative), so it has one step shape")
    return layouts, ""
  any_lay = next(iter(layouts.values()))
  packed = len(any_lay.shapes) - 1  # the last shape is the one-sequence-per-row fallback
  slots = [sum(lay.units * r * length for lay in layouts.values() for r, length in [lay.shapes[k]])
           for k in range(packed)]
  k = {"primary": any_lay.primary, "top": max(range(packed), key=slots.__getitem__)}.get(level)
  k = int(level) if k is None else k
  if not 0 <= k < packed:
    raise GritJaxError(f"--pack_level={level}: the recipe has packed levels 0..{packed - 1}")
  share = any_lay.use[k]
  out = {name: dataclasses.replace(lay, use=[float(i == k) for i in range(len(lay.use))])
         for name, lay in layouts.items()}
  return out, (f"compiled packed level {k} of {packed} ({level}; {share:.0%} of sampled steps): "
               + ", ".join(f"{n} {lay.shapes[k][0]}x{lay.shapes[k][1]}" for n, lay in layouts.items())
               + f"; {slots[k]} token slots (largest packed level {max(slots)}); the fallback "
               "(one sequence per row) is not compiled")


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class Stages:
  """Says when each stage of a compile starts and how long it took, as it goes: a 7B recipe compiles for minutes,
  which must not look like a hang. `with stages("compiling"):` prints "<prefix>: compiling ..." and then
  "<prefix>: compiling done in 12.3 s (elapsed 15.0 s)" (or "failed after")."""

  def __init__(self, prefix: str, log=None):
    self.prefix, self.log, self.t0 = prefix, log or _stderr, time.perf_counter()

  @contextlib.contextmanager
  def __call__(self, what: str):
    self.log(f"{self.prefix}: {what} ...")
    t, ok = time.perf_counter(), False
    try:
      yield
      ok = True
    finally:
      now = time.perf_counter()
      self.log(f"{self.prefix}: {what} {'done in' if ok else 'failed after'} {now - t:.1f} s "
               f"(elapsed {now - self.t0:.1f} s)")


def compile_for_topology(config, topology: str, num_slices: int = 1, *, hlo_path: str | None = None,
                         pack_level: str = "primary", log=None) -> AotResult:
  """Lowers and compiles the recipe's train step for `topology`; never runs it. A packed recipe compiles one of its
  step shapes (`at_pack_level`). Each stage is reported as it starts and ends to `log` (default: stderr)."""
  stages = Stages(f"aot {topology}" + (f" x{num_slices}" if num_slices > 1 else "")
                  + (f" (pack level {pack_level})" if pack_level != "primary" else ""), log)
  topo = topologies.get_topology(topology)
  devices = topo.devices(num_slices)  # sets the libtpu env defaults before jax touches libtpu
  import flax.linen as nn
  import jax

  from grit_jax import flops as flops_lib
  from grit_jax.modeling import kernels
  from grit_jax import sharding as mesh_lib

  with stages("building the abstract state and batch"):
    model_config = model_config_of(config)
    mesh, rules = mesh_lib.make_mesh(config.mesh, devices)
    all_levels = packed_layouts(config, mesh)
    packing_lines = [lay.describe() for lay in all_levels.values()]  # the levels and their shares on the data
    layouts, compiled_level = at_pack_level(all_levels, pack_level)
    train_step, state, batch = abstract_step(config, model_config, mesh, rules, layouts)

  flops = flops_lib.grit_step_flops_from_config(config, layouts)
  n_params = sum(x.size for x in jax.tree.leaves((state.params, state.frozen)))  # LoRA: adapters + frozen base
  res = AotResult(topology=topology, num_chips=len(devices), fits=True, hbm_bytes=topo.chip.hbm_bytes,
                  model_flops=flops.total, model_flops_embedding=flops.embedding,
                  model_flops_generative=flops.generative, param_count=n_params, num_slices=num_slices,
                  packing=packing_lines + ([compiled_level] if compiled_level else []),
                  pack_levels=len(next(iter(all_levels.values())).shapes) - 1 if all_levels else 0)
  t0 = time.perf_counter()
  with stages("tracing and lowering the train step"):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      res.attention_kernel = kernels.select_impl(model_config.attention_impl)
      traced = train_step.trace(state, batch)
      lowered = traced.lower()
    executed = flops_lib.executed_flops(traced.jaxpr)
  res.executed_flops, res.kernel_flops = executed.total, executed.kernels
  res.executed_loops_once = executed.loops_once
  try:
    with stages(f"compiling for {len(devices)} chips"):
      compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError; only the out-of-memory case is an answer
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    res.fits, res.error = False, _first_lines(str(e), 6)
    res.compile_seconds = time.perf_counter() - t0
    return res
  res.compile_seconds = time.perf_counter() - t0

  with stages("analysing memory, FLOPs and collectives"):
    mem = compiled.memory_analysis()
    res.argument_bytes, res.output_bytes = mem.argument_size_in_bytes, mem.output_size_in_bytes
    res.alias_bytes, res.temp_bytes = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    res.code_bytes = mem.generated_code_size_in_bytes
    judge_memory(res)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    res.xla_flops_per_chip = float(cost.get("flops", 0.0))
    text = compiled.as_text()
    if hlo_path:
      atomic_write(hlo_path, lambda f: f.write(text))
    analyze_collectives(res, text)

  # Roofline: executed FLOPs at peak; every byte a chip receives over ICI at its link bandwidth.
  chip = topo.chip
  res.est_compute_s = res.executed_flops / (res.num_chips * chip.peak_bf16_flops)
  ici_bytes = sum(r["bytes"] - r["cross_slice_bytes"] for r in res.traffic.values())
  res.est_comm_s = ici_bytes / chip.ici_bytes_per_s
  return res


def analyze_collectives(res: AotResult, hlo_text: str) -> None:
  """Fills res.collectives / traffic / cross_slice / unknown_loops from the compiled HLO text."""
  colls, res.unknown_loops = hlo.collectives(hlo_text, res.num_slices)
  res.traffic = hlo.summarize(colls)
  res.collectives = {k: row["ops"] for k, row in res.traffic.items()}
  res.cross_slice = sorted((c for c in colls if c.cross_slice), key=lambda c: -c.bytes_per_chip)


def judge_memory(res: AotResult) -> None:
  """A compile without devices rejects a program whose temporaries exceed HBM, but it does not count the arguments
  (the sharded train state and batch), which live in HBM too: a program can compile and still not fit. Judge the
  whole per-chip footprint."""
  if res.fits and res.total_bytes > res.hbm_bytes:
    res.fits = False
    res.error = (f"compiled, but arguments + outputs - aliased + temporaries = {gib(res.total_bytes)} per chip > "
                 f"{gib(res.hbm_bytes)} HBM (a compile without devices checks the temporaries alone)")


def _first_lines(s: str, n: int) -> str:
  return "\n".join(line for line in s.strip().splitlines()[:n])


def gib(b: float) -> str:
  return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.2f} MiB"
