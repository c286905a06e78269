"""Throughput of the GRIT train step: tokens/s, achieved model FLOP/s, and their ratio to a plain jitted matmul
measured in the same run (the practical ceiling of this machine).

  .venv/bin/python bench/train_step.py [--hidden 768 --layers 12 --seq 512 --queries 2 --gen 2 --steps 3]
                                       [--dtype float32|bfloat16] [--remat none|full|minimal|...] [--scan]

Default shape: a ~100M-parameter Mistral (d 768, 12 layers, 12 heads / 4 kv heads, mlp 2048, vocab 32000) at
sequence 512; one step = the query and passage passes (bidirectional, group size 2) + the causal generative pass,
backward, AdamW update. FLOPs are model FLOPs (grit_jax.flops: 6 * N * tokens + attention, LM head only on
the generative pass; remat recomputation not counted). Compilation is excluded (one warm-up step). The batch uses
every device jax sees (pure FSDP mesh); set XLA_FLAGS=--xla_force_host_platform_device_count=N to split a CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from _common import matmul_flops, ready_train_step, time_train_steps  # noqa: E402  (also puts the repo on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def synthetic_batch(rng, vocab, queries, group, gen, seq):
  """Full-length rows (no padding): every token computed is a real token, so tokens/s is not flattered."""
  ids = lambda b: rng.integers(3, vocab, size=(b, seq), dtype=np.int32)
  ones = lambda b: np.ones((b, seq), np.int32)
  pool = lambda b: np.concatenate([np.zeros((b, 8), np.int32), np.ones((b, seq - 8), np.int32)], 1)
  batch = {}
  if queries:
    batch.update(query_ids=ids(queries), query_mask=ones(queries), query_pool_mask=pool(queries),
                 passage_ids=ids(queries * group), passage_mask=ones(queries * group),
                 passage_pool_mask=pool(queries * group))
  if gen:
    g = ids(gen)
    labels = g.copy()
    labels[:, : seq // 4] = -100  # the prompt part of a chat is not supervised
    batch.update(gen_ids=g, gen_mask=ones(gen), gen_labels=labels)
  return batch


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--hidden", type=int, default=768)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--kv-heads", type=int, default=4)
  ap.add_argument("--mlp", type=int, default=2048)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--queries", type=int, default=2, help="queries per step (passages = queries * group)")
  ap.add_argument("--group", type=int, default=2)
  ap.add_argument("--gen", type=int, default=2, help="generative rows per step")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  from grit_jax.modeling.config import REMAT_POLICIES
  ap.add_argument("--remat", default="none", choices=tuple(REMAT_POLICIES))
  ap.add_argument("--scan", action="store_true", help="nn.scan over layers")
  ap.add_argument("--grad-accum", type=int, default=1)
  ap.add_argument("--gradcache-chunk", type=int, default=0)
  args = ap.parse_args(argv)

  from configs import base
  from grit_jax.modeling import get_config
  from grit_jax import flops as flops_lib

  mc = get_config("tiny_mistral", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                  num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                  head_dim=args.hidden // args.heads, max_position_embeddings=max(2048, args.seq),
                  dtype=args.dtype, remat_policy=args.remat, scan_layers=args.scan)
  cfg = base.get_config("tiny_mistral")
  cfg.attn = "bbcc"
  cfg.train.steps = 1000
  cfg.train.grad_accum, cfg.train.gradcache_chunk = args.grad_accum, args.gradcache_chunk
  batch_np = synthetic_batch(np.random.default_rng(0), args.vocab, args.queries, args.group, args.gen, args.seq)
  state, step, batch = ready_train_step(mc, cfg, batch_np, mesh_axes=dict(data=1, fsdp=-1, tensor=1, expert=1))
  n_params = flops_lib.num_params(state.params)
  tokens = sum(int(v.size) for k, v in batch_np.items() if k.endswith("_mask") and "pool" not in k)
  step_flops = flops_lib.step_flops(mc, batch_np, attn=cfg.attn)

  print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; params {n_params / 1e6:.1f}M; "
        f"dtype {args.dtype}, remat {args.remat}, scan {args.scan}")
  print(f"batch: {args.queries} queries + {args.queries * args.group} passages + {args.gen} generative rows "
        f"x {args.seq} tokens = {tokens} tokens; model FLOPs/step {step_flops.total / 1e12:.3f} T "
        f"(embedding {step_flops.embedding / 1e12:.3f} T, generative {step_flops.generative / 1e12:.3f} T)")

  # The matmul is timed right before and right after the steps (other processes sharing the cores change the
  # ceiling over a run); the CPU-time ratio is the fairer number when the machine is shared.
  mm_before = matmul_flops(dtype=jnp.float32)
  first, times, cpu_s, state, m = time_train_steps(state, step, batch, args.steps)
  print(f"compile + first step: {first:.1f} s")
  step_cpu_s = cpu_s / args.steps
  mm_after = matmul_flops(dtype=jnp.float32)
  step_s = float(np.median(times))
  mm32, mm32_cpu = (mm_before[0] + mm_after[0]) / 2, (mm_before[1] + mm_after[1]) / 2

  achieved = step_flops.total / step_s
  print(f"step: {step_s:.2f} s (median of {args.steps}: {', '.join(f'{x:.2f}' for x in times)}; "
        f"{step_cpu_s:.1f} CPU-s each); loss {float(m['loss']):.4f}")
  print(f"tokens/s: {tokens / step_s:,.0f}")
  print(f"achieved: {achieved / 1e9:.1f} GFLOP/s")
  print(f"float32 2048^3 matmul: {mm32 / 1e9:.1f} GFLOP/s (before {mm_before[0] / 1e9:.1f}, after "
        f"{mm_after[0] / 1e9:.1f}) -> step/matmul = {achieved / mm32:.1%}")
  print(f"per CPU-second: step {step_flops.total / step_cpu_s / 1e9:.1f} GFLOP, matmul {mm32_cpu / 1e9:.1f} GFLOP "
        f"-> {step_flops.total / step_cpu_s / mm32_cpu:.1%}")
  if args.dtype == "bfloat16":
    mm16 = matmul_flops(dtype=jnp.bfloat16)[0]
    print(f"bf16-input matmul (f32 accumulation): {mm16 / 1e9:.1f} GFLOP/s -> step/matmul = {achieved / mm16:.1%}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
