"""One GRIT train step on one GPU at a ~1B-parameter Mistral shape, sequence 2048: step time and MFU.

  python3 bench/gpu_mfu.py [--impl cudnn|xla] [--remat full] [--steps 5] [--peak 989e12]

Model: Mistral layout, d=2048, 16 layers, 16 heads / 8 kv heads, head_dim 128, MLP 5632, vocab 32000 (~1.1B
params); bf16 compute, float32 master weights and Adam. Batch: 8 queries x 256 + 16 passages x 2048 (bidirectional)
+ 8 generative x 2048 (causal). MFU = model FLOPs (grit_jax.flops: no remat recompute) / (time x peak);
--peak defaults to the device's dense bf16 peak from grit_jax.flops (H100 SXM: 989 TFLOP/s). Target: >= 35%.
Runs anywhere jax sees a GPU (the image needs jax with CUDA, flax, optax, ml_collections).
"""
import argparse
import statistics

p = argparse.ArgumentParser()
p.add_argument("--impl", default="auto", help="attention_impl: auto (cudnn on GPU) | cudnn | xla")
p.add_argument("--remat", default="full")
p.add_argument("--steps", type=int, default=5)
p.add_argument("--peak", type=float, default=None, help="FLOP/s (default: the device's bf16 peak)")
p.add_argument("--batch", type=int, nargs=3, default=[8, 16, 8], help="queries, passages, generative rows")
args = p.parse_args()
from _common import ready_train_step, time_train_steps  # noqa: E402  (also puts the repo on sys.path)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from grit_jax.modeling import ModelConfig  # noqa: E402
from grit_jax import flops as mfu  # noqa: E402

c = base.get_config("mistral_7b")
m = c.model
m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 2048, 16, 16, 8, 128
m.intermediate_size, m.vocab_size, m.sliding_window = 5632, 32000, None
m.dtype, m.scan_layers, m.remat_policy, m.attention_impl = "bfloat16", True, args.remat, args.impl
bq, bp, bg = args.batch
d = c.data
d.embedding_batch_size, d.train_group_size, d.generative_batch_size = bq, bp // bq, bg
d.query_max_len, d.passage_max_len, d.generative_max_len = 256, 2048, 2048
c.mesh.fsdp = 1

rng = np.random.default_rng(0)


def rows(n, length):
  ids = rng.integers(3, m.vocab_size, (n, length)).astype(np.int32)
  return ids, np.ones((n, length), np.int32)


qi, qm = rows(bq, 256)
pi, pm = rows(bp, 2048)
gi, gm = rows(bg, 2048)
batch = dict(query_ids=qi, query_mask=qm, query_pool_mask=qm, passage_ids=pi, passage_mask=pm, passage_pool_mask=pm,
             gen_ids=gi, gen_mask=gm, gen_labels=gi)
state, train_step, batch = ready_train_step(ModelConfig(**m.to_dict()), c, batch, devices=jax.devices()[:1])
n_params = sum(x.size for x in jax.tree.leaves(state.params))
compile_s, times, _, state, metrics = time_train_steps(state, train_step, batch, args.steps)
step_s = statistics.median(times)
flops = mfu.grit_step_flops_from_config(c)
print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; {n_params / 1e9:.2f} B params; "
      f"attention {args.impl}, remat {args.remat}")
print(f"batch {bq}q x 256 + {bp}p x 2048 + {bg}g x 2048; model FLOPs/step {flops.total:.4g} "
      f"(embedding {flops.embedding:.4g}, generative {flops.generative:.4g})")
print(f"first step (compile) {compile_s:.1f} s; step {step_s * 1e3:.1f} ms (median of {args.steps}); "
      f"loss {float(metrics['loss']):.3f}")
peak = args.peak or mfu.peak_flops(jax.devices()[:1], c.model.dtype)
util = mfu.mfu(flops.total, step_s, 1, peak)
print(f"MFU {util:.1%} of {peak / 1e12:.0f} TFLOP/s ({'PASS' if util >= 0.35 else 'FAIL'}, target >= 35%)")
