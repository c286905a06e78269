"""Mixtral's MoE layer, routed (moe_impl="ragged") vs dense (every expert on every token): forward + backward time
in one run (target: routed >= 2.5x faster on CPU).

  .venv/bin/python bench/moe.py [--tokens 4096] [--hidden 512] [--mlp 1792] [--experts 8] [--top-k 2]

Mixtral proportions (E=8, k=2, I = 3.5 D) at shrunk widths. Times `SparseMoe` (router, experts, statistics) under
jit: value and gradient of a scalar of its output w.r.t. the parameters and the input. Interleaved medians.
Also prints each path's matmul FLOPs over its time, against a plain matmul measured in the same run.
"""
import argparse
import os

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=4096)
p.add_argument("--hidden", type=int, default=512)
p.add_argument("--mlp", type=int, default=1792)
p.add_argument("--experts", type=int, default=8)
p.add_argument("--top-k", type=int, default=2)
p.add_argument("--dtype", default="float32")
p.add_argument("--runs", type=int, default=5)
args = p.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import _common  # noqa: E402  (puts the repo on sys.path, sets the CPU host up)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from grit_jax.modeling import get_config  # noqa: E402
from grit_jax.modeling.layers import SparseMoe  # noqa: E402
from grit_jax.modeling.moe import select_gmm_impl  # noqa: E402

B, T = 2, args.tokens // 2
base = get_config("tiny_mixtral", hidden_size=args.hidden, intermediate_size=args.mlp, num_experts=args.experts,
                  num_experts_per_tok=args.top_k, dtype=args.dtype)
x_BTD = jax.random.normal(jax.random.PRNGKey(1), (B, T, args.hidden), jnp.float32).astype(args.dtype)
mask_BT = jnp.ones((B, T), jnp.int32)
params = SparseMoe(base).init(jax.random.PRNGKey(0), x_BTD, mask_BT)["params"]


def make_step(impl):
  layer = SparseMoe(base.replace(moe_impl=impl))

  def loss(p, x):
    y_BTD, stats = layer.apply({"params": p}, x, mask_BT)
    return jnp.mean(y_BTD.astype(jnp.float32) ** 2) + 1e-3 * jnp.sum(stats)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


steps = {impl: make_step(impl) for impl in ("dense", "ragged")}
times = {impl: [] for impl in steps}
for impl, f in steps.items():
  _common.wall_times(lambda: f(params, x_BTD), 1, warmup=1)  # compile
for _ in range(args.runs):  # interleaved: both paths see the same load
  for impl, f in steps.items():
    times[impl] += _common.wall_times(lambda: f(params, x_BTD), 1, warmup=0)
med = {impl: sorted(t)[len(t) // 2] for impl, t in times.items()}
peak, _ = _common.matmul_flops()

N, D, I, E, k = B * T, args.hidden, args.mlp, args.experts, args.top_k
flops = {"dense": 3 * 3 * 2 * N * E * D * I, "ragged": 3 * 3 * 2 * N * k * D * I}  # 3 matmuls x (fwd + 2 bwd)
print(f"MoE layer N={N} tokens, D={D}, I={I}, E={E}, k={k}, {args.dtype}; grouped matmul "
      f"{select_gmm_impl()!r}; median of {args.runs}")
for impl in steps:
  print(f"  {impl:6s}: fwd+bwd {med[impl] * 1e3:8.1f} ms   expert matmuls {flops[impl] / med[impl] / 1e9:6.1f} GFLOP/s "
        f"({flops[impl] / med[impl] / peak:.0%} of a {peak / 1e9:.0f} GFLOP/s matmul)")
ratio = med["dense"] / med["ragged"]
print(f"routed is {ratio:.2f}x faster than dense", "PASS" if ratio >= 2.5 else "FAIL", "(target >= 2.5x)")
