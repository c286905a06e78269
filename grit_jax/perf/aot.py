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

The compile itself: perf/aot_compile.py.
"""
from __future__ import annotations

import os
import sys

from grit_jax.errors import GritJaxError
from grit_jax.perf import topologies
from grit_jax.perf.aot_compile import AotResult, compile_for_topology, gib

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
      f"topology: {res.num_slices} x {res.topology} ({res.num_chips} chips, {gib(res.hbm_bytes)} HBM each); "
      f"compile {res.compile_seconds:.1f} s",
  ]
  lines += [f"packed {line}" for line in res.packing]  # token slots per pass and expected efficiency on the data
  if not res.fits and not res.temp_bytes:
    lines += ["RESULT: DOES NOT FIT (RESOURCE_EXHAUSTED at compile time)", res.error]
    return "\n".join(lines)
  lines += [
      f"memory per chip: arguments {gib(res.argument_bytes)}, outputs {gib(res.output_bytes)}, "
      f"aliased {gib(res.alias_bytes)}, temporaries {gib(res.temp_bytes)} -> total {gib(res.total_bytes)} "
      f"of {gib(res.hbm_bytes)} ({res.total_bytes / res.hbm_bytes:.0%})",
      f"model FLOPs per step: {res.model_flops:.4g} (embedding {res.model_flops_embedding:.4g}, generative "
      f"{res.model_flops_generative:.4g}); per chip {res.model_flops / res.num_chips:.4g}",
      f"executed FLOPs per chip: {res.executed_flops / res.num_chips:.4g} = {res.executed_flops / max(res.model_flops, 1):.2f}"
      f" x model FLOPs (remat recompute, all computed positions and experts; attention kernel {res.attention_kernel}"
      + (f", whose {res.kernel_flops / res.num_chips:.3g} count every key block" if res.kernel_flops else "") + ")",
      f"XLA cost_analysis FLOPs per chip: {res.xla_flops_per_chip:.4g} (as MaxText prints it: a scanned layer "
      "loop counted once, splash kernels not at all); executed with each loop once, the same convention: "
      f"{res.executed_loops_once / res.num_chips:.4g}",
      "collectives per chip per step (static ops, runs with loops multiplied out, bytes received):",
      *(f"  {k:<18} {r['ops']:>4} ops {r['runs']:>7.0f} runs {gib(r['bytes']):>12}" for k, r in res.traffic.items()),
  ]
  if res.num_slices > 1:
    cross = sum(r["cross_slice_bytes"] for r in res.traffic.values())
    lines.append(f"across the {res.num_slices} slices (data-center network): {len(res.cross_slice)} ops, "
                 f"{gib(cross)} per chip per step; largest:")
    lines += [f"  {c.kind} {c.result[:60]} x{c.runs:.0f}: {gib(c.bytes_per_chip)}" for c in res.cross_slice[:6]]
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
        f"{gib(max(r.total_bytes for r in results))}")
  return 0 if fits else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
