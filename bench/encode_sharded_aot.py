"""Does `encode` of a model too big for one chip run when its weights are sharded? The embedding pass of GritLM-7B
(bf16 weights, 14.5 GB; float32, 29 GB) compiled for a TPU slice of 16 GiB chips on this CPU host (libtpu, no TPU), with the
weights as `encode` places them: replicated, or FSDP-sharded over the chips (`inference.placement.weight_shardings`,
the training mesh rules: what `shard_weights=None` picks when the weights exceed half a chip). Per-chip memory
from the compiler; nothing runs.

  .venv/bin/python bench/encode_sharded_aot.py [--topology v5e-8] [--batch 64] [--length 512] [--dtype float32]
"""
import argparse
import os

p = argparse.ArgumentParser()
p.add_argument("--topology", default="v5e-8")
p.add_argument("--model", default="mistral_7b")
p.add_argument("--batch", type=int, default=64, help="rows per encode call (split over the chips)")
p.add_argument("--length", type=int, default=512)
p.add_argument("--dtype", default="bfloat16", help="weights and compute (float32: 29 GB of weights)")
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
for shard in (False, True):
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
