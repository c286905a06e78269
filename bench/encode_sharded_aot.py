"""Does `encode` of a model too big for one chip run when its weights are sharded? The embedding pass of GritLM-7B
(bf16 weights, 14.5 GB; float32, 29 GB) compiled for a TPU slice of 16 GiB chips on this CPU host (libtpu, no TPU), with the
weights as `encode` places them: replicated, or FSDP-sharded over the chips (`inference.placement.weight_shardings`,
the training mesh rules: what `shard_weights=None` picks when the weights exceed half a chip). Per-chip memory
from the compiler; nothing runs.

  .venv/bin/python bench/encode_sharded_aot.py [--topology v5e-8] [--batch 64] [--length 512] [--dtype float32]
      [--corpus-docs 100000000] [--roofline-only]

Then the corpus-index figure (`grit-jax index`'s encode pass): the shipped passages (data/*/, their length spread;
tokenized with SmolLM2's BPE tokenizer as a stand-in for Mistral's, which is not shipped) packed as `encode` packs
them (rows of --length tokens, the rows split over the chips), the packed call compiled with the weights sharded,
and its roofline time from the compiler's per-chip FLOPs and bytes (max of FLOPs / peak and bytes / HBM bandwidth):
documents/s and the hours for --corpus-docs documents of that length spread. A roofline, not a measurement.
"""
import argparse
import os

p = argparse.ArgumentParser()
p.add_argument("--topology", default="v5e-8")
p.add_argument("--model", default="mistral_7b")
p.add_argument("--batch", type=int, default=64, help="rows per encode call (split over the chips)")
p.add_argument("--length", type=int, default=512)
p.add_argument("--dtype", default="bfloat16", help="weights and compute (float32: 29 GB of weights)")
p.add_argument("--corpus-docs", type=float, default=1e8, help="corpus size for the indexing-time figure")
p.add_argument("--roofline-only", action="store_true", help="skip the replicated / sharded memory compiles")
args = p.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only compiles
import _common  # noqa: E402,F401  (puts the repository on sys.path)

from grit_jax.perf import topologies  # noqa: E402

devices = topologies.get_topology(args.topology).devices()
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from grit_jax.inference import encode as encode_lib  # noqa: E402
from grit_jax.inference import placement  # noqa: E402
from grit_jax.modeling import Transformer, get_config  # noqa: E402
from grit_jax import sharding as mesh_lib  # noqa: E402

config = get_config(args.model, dtype=args.dtype, param_dtype=args.dtype)
abstract = nn.meta.unbox(jax.eval_shape(lambda: Transformer(config).init(
    jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32), causal=False)["params"]))
param_gb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)) / 1e9
hbm = topologies.get_topology(args.topology).chip.hbm_bytes
print(f"{args.model}: {param_gb:.1f} GB of {args.dtype} weights; {args.topology}: {len(devices)} chips of "
      f"{hbm / 2**30:.0f} GiB; encode call {args.batch} x {args.length} tokens, rows split over the chips")
fn = encode_lib.embed_fn(config, causal=False, pooling="mean", normalize=True, with_cache=False)
for shard in () if args.roofline_only else (False, True):
  mesh, rules = mesh_lib.make_mesh({"data": 1, "fsdp": -1}, devices)
  params_sharding, rows = placement.weight_shardings(config, abstract, mesh, rules, shard)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, params_sharding)
  batch = [jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32, sharding=rows) for _ in range(3)]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = fn.trace(params, *batch).lower()
  try:
    mem = lowered.compile().memory_analysis()
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError: only running out of memory is an answer
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print(f"weights {'sharded' if shard else 'replicated'}: does not fit ({str(e).splitlines()[0][:160]})")
    continue
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  print(f"weights {'sharded   ' if shard else 'replicated'}: per chip arguments {mem.argument_size_in_bytes / 2**30:.2f}"
        f" GiB + temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB = {total / 2**30:.2f} GiB of "
        f"{hbm / 2**30:.0f}: {'fits' if total <= hbm else 'DOES NOT FIT'}")


# --- the corpus-index roofline: packed encode calls over the shipped length spread -------------------------------
import numpy as np  # noqa: E402
from embed_vs_st import shipped_passages  # noqa: E402

from grit_jax.convert import gguf  # noqa: E402
from grit_jax.data.tokenizer import Tokenizer  # noqa: E402

tok = Tokenizer(os.path.join(gguf.model_dir(gguf.smollm2_path()), "tokenizer.json"))
lengths = [min(len(tok.encode("<|embed|>\n" + t)) + 1, args.length) for t in shipped_passages()]  # + BOS
layout, units = encode_lib.plan_packed(lengths, args.batch, args.length, len(devices))
calls = -(-len(units) // layout.units)
mesh, rules = mesh_lib.make_mesh({"data": 1, "fsdp": -1}, devices)
params_sharding, rows = placement.weight_shardings(config, abstract, mesh, rules, True)
params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, params_sharding)
shape = (layout.units, layout.rows, layout.row_len)
unit_rows = jax.sharding.NamedSharding(mesh, jax.P(rows.spec[0]))
arrays = [jax.ShapeDtypeStruct(shape, jnp.int32, sharding=unit_rows) for _ in range(4)]
pfn = encode_lib.packed_embed_fn(config, False, "mean", True, layout.per_unit)
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
  compiled = pfn.trace(params, *arrays).lower().compile()
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, list) else cost
chip = topologies.get_topology(args.topology).chip
t_flops, t_bytes = cost["flops"] / chip.peak_bf16_flops, cost["bytes accessed"] / chip.hbm_bytes_per_s
t_call = max(t_flops, t_bytes)
docs_per_call = len(lengths) / calls
docs_s = docs_per_call / t_call
print(f"corpus index: {len(lengths)} shipped passages, tokens median {int(np.median(lengths))} / mean "
      f"{np.mean(lengths):.0f} / max {max(lengths)}; packed {layout.units} rows x {layout.row_len} per call "
      f"(<= {layout.per_unit} texts a row), {docs_per_call:.0f} documents per call, "
      f"{sum(lengths) / (calls * layout.units * layout.row_len):.1%} of slots hold text")
print(f"per chip per call: {cost['flops']:.3e} FLOPs ({t_flops * 1e3:.2f} ms at {chip.peak_bf16_flops:.3g} FLOP/s), "
      f"{cost['bytes accessed'] / 2**30:.2f} GiB accessed ({t_bytes * 1e3:.2f} ms at "
      f"{chip.hbm_bytes_per_s / 1e9:.0f} GB/s): roofline {t_call * 1e3:.2f} ms, "
      f"{'compute' if t_flops >= t_bytes else 'memory'}-bound")
print(f"roofline: {docs_s:,.0f} documents/s on {args.topology} ({len(devices)} chips); {args.corpus_docs:.3g} "
      f"documents: {args.corpus_docs / docs_s / 3600:.2f} hours ({args.corpus_docs / docs_s / 3600 * len(devices):.1f}"
      " chip-hours)")
