"""Compile time of the GRIT train step with a scanned 32-layer model vs a 2-layer one (target: <= 1.5x).

  .venv/bin/python bench/compile_time.py [--layers 2 32] [--hidden 256] [--remat full]

nn.scan traces and compiles the decoder layer once whatever the depth, so compile time should barely grow with
layers; an unscanned stack (--no-scan, shown for contrast) grows linearly.
"""
import argparse
import os
import time

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, nargs="+", default=[2, 32])
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--remat", default="full")
p.add_argument("--no-scan", action="store_true")
p.add_argument("--repeats", type=int, default=2, help="min over this many compiles each (interleaved)")
args = p.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import _common  # noqa: E402,F401  (puts the repo on sys.path)

import jax  # noqa: E402

from configs import tiny  # noqa: E402
from grit_jax.modeling import ModelConfig  # noqa: E402
from grit_jax.perf.aot import abstract_batch  # noqa: E402
from grit_jax import sharding as mesh_lib
from grit_jax.training import optimizer as opt_lib, state as state_lib, step as step_lib  # noqa


def compile_seconds(num_layers: int) -> float:
  config = tiny.get_config()
  m = config.model
  m.num_layers, m.hidden_size, m.intermediate_size = num_layers, args.hidden, 4 * args.hidden
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, args.hidden // 4
  m.scan_layers, m.remat_policy = not args.no_scan, args.remat
  model_config = ModelConfig(**m.to_dict())
  mesh, rules = mesh_lib.make_mesh(config.mesh)
  tx = opt_lib.make_optimizer(config.optimizer, config.train.steps)
  abstract, shardings = state_lib.state_shardings(model_config, tx, mesh, rules)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch = abstract_batch(config.data, step_lib.input_batch_sharding(mesh))
  step = step_lib.make_train_step(model_config, config, mesh, rules, state_shardings=shardings)
  t0 = time.perf_counter()
  step.lower(state, batch).compile()
  return time.perf_counter() - t0


compile_seconds(args.layers[0])  # warm-up: imports, jax's own first-compile costs
times = {n: float("inf") for n in args.layers}
for _ in range(args.repeats):  # interleaved, min: robust to other load on the host
  for n in args.layers:
    times[n] = min(times[n], compile_seconds(n))
for n, t in times.items():
  print(f"{n:3d} layers ({'unscanned' if args.no_scan else 'scanned'}, remat {args.remat}): "
        f"lower+compile {t:.2f} s (min of {args.repeats})")
lo, hi = times[min(times)], times[max(times)]
ratio = hi / lo
print(f"ratio {max(times)}/{min(times)} layers: {ratio:.2f}x", "PASS" if ratio <= 1.5 else "FAIL", "(target <= 1.5x)")
