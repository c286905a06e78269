"""`grit-jax aot`: compile a recipe's train step for a TPU slice ahead of time, on any host (CPU is enough).

  grit-jax aot --config configs/gritlm_7b.py --topology v5p-64 [--num_slices 1] [--config.KEY=VALUE ...]

With libtpu installed (`pip install 'jax[tpu]'`), `get_topology_desc` describes the slice's chips; the real train
step (grit_jax.training.step) is lowered over a mesh of them with abstract, sharded state and batch and compiled by
the TPU compiler. Prints per-chip memory (memory_analysis), FLOPs, the collectives XLA inserted, and a roofline
estimate of the step time and MFU. A recipe that does not fit in HBM fails to compile with RESOURCE_EXHAUSTED, or
compiles with arguments + temporaries over HBM (a compile without devices checks temporaries alone); either is
reported as "does not fit" (exit status 1).

What the numbers mean:
- memory: bytes per chip of arguments (state + batch shard), outputs, temporaries (activations, gathered weights,
  gradients) -- total = arguments + outputs - aliased (donated state) + temporaries; compared with the chip's HBM.
- model FLOPs: grit_jax.flops (embedding passes and generative pass counted separately; no remat recompute): what
  MFU divides by.
- executed FLOPs per chip: the matmuls the traced step really runs (grit_jax.flops.executed_flops: scanned layers
  x num_layers, remat's recomputed forward, all experts of a dense MoE, the routed MoE's grouped matmuls (megablox
  gmm / tgmm: forward, recompute, dx and dw over each expert's own rows), Pallas attention kernels over every key
  block), over the chips. XLA's cost_analysis is printed beside it, as MaxText prints it: it counts a scanned layer
  stack's loop body once, megablox kernels by their cost estimate and splash kernels not at all; the "executed with
  each loop once" number printed next to it counts loops the same way.
- collectives: per kind, the static ops of the compiled program, how often they run (loops multiplied out) and the
  bytes each chip receives per step (grit_jax.perf.hlo); with several slices, which of them cross the data-center
  network and their bytes, largest first.
- estimated step time: a roofline lower bound: max(executed FLOPs at peak bf16 FLOP/s, collective bytes received
  per chip over ICI); the MFU printed is model FLOPs over chips x peak x that time (an upper bound). Cross-slice
  bytes are printed, not timed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

from grit_jax import common_types as ct
from grit_jax.errors import GritJaxError
from grit_jax.fileio import atomic_write
from grit_jax.perf import hlo, topologies

USAGE = "usage: grit-jax aot --config configs/RECIPE.py --topology v5p-64 [--num_slices N] [--config.KEY=VALUE ...]"


# ---------------------------------------------------------------------------------------------------------------
# Command line

def _define_flags(fv) -> None:
  from absl import flags

  flags.DEFINE_string("topology", None, "TPU slice as Cloud TPU names it: v5p-64, v5e-16, v4-128, v6e-8, ...",
                      flag_values=fv)
  flags.DEFINE_integer("num_slices", 1, "slices joined over the data-center network (multislice); "
                       "config.mesh.dcn_* split them", flag_values=fv)
  flags.DEFINE_string("write_hlo", None, "also write the compiled program's HLO text to this file", flag_values=fv)
  flags.DEFINE_string("pack_level", "primary", "which step shape of a packed recipe to compile: 'primary' (the "
                      "level most steps take: typical FLOPs and time), 'top' (the level with the most token slots), "
                      "a level index 0..pack_levels-1, or 'all' (each packed level in turn: a run fits when every "
                      "one does; memory is not monotonic in token slots)", flag_values=fv)


def parse_args(argv: list[str]):
  """(config, topology name, num_slices, write_hlo path, pack_level) from argv, or None after --help; bad input raises
  GritJaxError. The config is validated against the topology's chip count (no data or weights are read)."""
  from grit_jax import contract, recipe_flags

  parsed = recipe_flags.parse("aot", USAGE, argv, _define_flags, description=DESCRIPTION)
  if parsed is None:
    return None
  config, fv = parsed
  if not fv.topology:
    raise GritJaxError(f"--topology is required (e.g. v5p-64)\n{USAGE}")
  if fv.num_slices < 1:
    raise GritJaxError(f"--num_slices={fv.num_slices}: must be >= 1")
  if fv.pack_level not in ("primary", "top", "all") and not fv.pack_level.isdigit():
    raise GritJaxError(f"--pack_level={fv.pack_level!r}: use primary, top, all or a level index")
  num_chips = topologies.get_topology(fv.topology).num_chips * fv.num_slices
  contract.validate(config, num_devices=num_chips, num_slices=fv.num_slices, check_files=False, log=None)
  return config, fv.topology, fv.num_slices, fv.write_hlo, fv.pack_level


# ---------------------------------------------------------------------------------------------------------------
# Compilation

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


def _model_config(config):
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
    model_config = _model_config(config)
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
    res.error = (f"compiled, but arguments + outputs - aliased + temporaries = {_gib(res.total_bytes)} per chip > "
                 f"{_gib(res.hbm_bytes)} HBM (a compile without devices checks the temporaries alone)")


def _first_lines(s: str, n: int) -> str:
  return "\n".join(line for line in s.strip().splitlines()[:n])


def _gib(b: float) -> str:
  return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.2f} MiB"


def _secs(s: float) -> str:
  return f"{s:.2f} s" if s >= 0.1 else f"{s * 1e3:.3f} ms"


def format_report(config, res: AotResult) -> str:
  m = config.model
  d = config.data
  lines = [
      f"recipe: {m.num_layers} layers, d={m.hidden_size}, experts={m.num_experts}, params {res.param_count / 1e9:.2f} B;"
      f" dtype {m.dtype}, remat {m.remat_policy}, attention {m.attention_impl}",
      f"batch: mode {d.mode}, embedding {d.embedding_batch_size} queries x {d.query_max_len} + "
      f"{d.embedding_batch_size * d.train_group_size} passages x {d.passage_max_len}, generative {d.generative_batch_size} x {d.generative_max_len}; "
      f"gradcache_chunk {config.train.gradcache_chunk}, grad_accum {config.train.grad_accum}; mesh "
      f"{dict(config.mesh)}",
      f"topology: {res.num_slices} x {res.topology} ({res.num_chips} chips, {_gib(res.hbm_bytes)} HBM each); "
      f"compile {res.compile_seconds:.1f} s",
  ]
  lines += [f"packed {line}" for line in res.packing]  # token slots per pass and expected efficiency on the data
  if not res.fits and not res.temp_bytes:
    lines += ["RESULT: DOES NOT FIT (RESOURCE_EXHAUSTED at compile time)", res.error]
    return "\n".join(lines)
  lines += [
      f"memory per chip: arguments {_gib(res.argument_bytes)}, outputs {_gib(res.output_bytes)}, "
      f"aliased {_gib(res.alias_bytes)}, temporaries {_gib(res.temp_bytes)} -> total {_gib(res.total_bytes)} "
      f"of {_gib(res.hbm_bytes)} ({res.total_bytes / res.hbm_bytes:.0%})",
      f"model FLOPs per step: {res.model_flops:.4g} (embedding {res.model_flops_embedding:.4g}, generative "
      f"{res.model_flops_generative:.4g}); per chip {res.model_flops / res.num_chips:.4g}",
      f"executed FLOPs per chip: {res.executed_flops / res.num_chips:.4g} = {res.executed_flops / max(res.model_flops, 1):.2f}"
      f" x model FLOPs (remat recompute, all computed positions and experts; attention kernel {res.attention_kernel}"
      + (f", whose {res.kernel_flops / res.num_chips:.3g} count every key block" if res.kernel_flops else "") + ")",
      f"XLA cost_analysis FLOPs per chip: {res.xla_flops_per_chip:.4g} (as MaxText prints it: a scanned layer "
      "loop counted once, splash kernels not at all); executed with each loop once, the same convention: "
      f"{res.executed_loops_once / res.num_chips:.4g}",
      "collectives per chip per step (static ops, runs with loops multiplied out, bytes received):",
      *(f"  {k:<18} {r['ops']:>4} ops {r['runs']:>7.0f} runs {_gib(r['bytes']):>12}" for k, r in res.traffic.items()),
  ]
  if res.num_slices > 1:
    cross = sum(r["cross_slice_bytes"] for r in res.traffic.values())
    lines.append(f"across the {res.num_slices} slices (data-center network): {len(res.cross_slice)} ops, "
                 f"{_gib(cross)} per chip per step; largest:")
    lines += [f"  {c.kind} {c.result[:60]} x{c.runs:.0f}: {_gib(c.bytes_per_chip)}" for c in res.cross_slice[:6]]
  if res.unknown_loops:
    lines.append(f"note: {res.unknown_loops} while loop(s) of unknown trip count: their collectives counted once")
  lines += [
      f"estimated step time (roofline at peak {res._chip.peak_bf16_flops / 1e12:.0f} TFLOP/s/chip): "
      f"{_secs(res.est_step_s)} (compute {_secs(res.est_compute_s)}, ICI traffic {_secs(res.est_comm_s)}"
      + (", cross-slice traffic not timed" if res.num_slices > 1 else "")
      + f") -> MFU at most {res.est_mfu:.1%}",
      "RESULT: FITS" if res.fits else f"RESULT: DOES NOT FIT ({res.error})",
  ]
  return "\n".join(lines)


DESCRIPTION = """Compiles the recipe's train step for a TPU slice on this host (needs libtpu, no TPU) and prints per-chip
memory, model and executed FLOPs, the collectives' bytes per chip, and a roofline step time; exit status 1 if it
does not fit."""


def main(argv: list[str]) -> int:
  topologies.quiet_libtpu_env()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only compiles; it never runs TPU code
  parsed = parse_args(argv)
  if parsed is None:  # --help
    return 0
  config, topology, num_slices, hlo_path, pack_level = parsed
  topologies.get_topology(topology)  # fail fast on a bad name
  if pack_level != "all":
    res = compile_for_topology(config, topology, num_slices, hlo_path=hlo_path, pack_level=pack_level)
    print(format_report(config, res))
    return 0 if res.fits else 1
  results = [compile_for_topology(config, topology, num_slices, hlo_path=hlo_path, pack_level="0")]
  print(format_report(config, results[0]), flush=True)
  for level in range(1, results[0].pack_levels):  # the other packed levels (an unpacked recipe has one shape)
    results.append(compile_for_topology(config, topology, num_slices, pack_level=str(level)))
    print(format_report(config, results[-1]), flush=True)
  fits = all(r.fits for r in results)
  print(f"RESULT over {len(results)} step shape(s): {'FITS' if fits else 'DOES NOT FIT'}; largest total per chip "
        f"{_gib(max(r.total_bytes for r in results))}")
  return 0 if fits else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
