"""GRIT train step: grit_jax vs the PyTorch reference path (transformers Mistral + the GritLM loss in torch), same
model shape, same batch, same machine, one run. Also: our achieved FLOP/s vs a plain jitted matmul.

  .venv/bin/python bench/vs_torch.py [--sizes tiny 100m] [--steps 3] [--threads N] [--scan] [--matmul xla]

Both sides: float32 on CPU, AdamW + global-norm clipping, the full GRIT loss (bidirectional mean-pooled query and
passage passes, contrastive loss at temperature 0.02 with in-batch + hard negatives, causal LM loss on the
generative batch, summed), one optimizer update per step. Times are the median of --steps steps after a warm-up
step (ours: after compilation). Targets: ours >= 1.3x faster; achieved FLOP/s >= 40% of the matmul's at ~100M.
Ours runs as the tiny recipe does on CPU: unrolled layers (ModelConfig default; --scan = nn.scan, as the 7B recipes
on TPU) and matmul_impl "auto" (= flat on CPU; --matmul xla = plain dot_general, for the ablation).
"""
import argparse
import os
import statistics

p = argparse.ArgumentParser()
p.add_argument("--sizes", nargs="+", default=["tiny", "100m"])
p.add_argument("--steps", type=int, default=3)
p.add_argument("--threads", type=int, default=os.cpu_count())
p.add_argument("--scan", action="store_true", help="scan the layers (default: unrolled, the CPU recipes' layout)")
p.add_argument("--matmul", default="auto", choices=["auto", "xla", "flat"], help="ModelConfig.matmul_impl")
args = p.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from _common import matmul_flops, ready_train_step, time_train_steps, wall_times  # noqa: E402  (also puts the repo on sys.path)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch_reference import make_torch_step  # noqa: E402

from configs import tiny  # noqa: E402
from grit_jax.modeling import ModelConfig  # noqa: E402
from grit_jax import flops as mfu  # noqa: E402

torch.set_num_threads(args.threads)

# name -> (model overrides, (queries, query len, passage len, gen batch, gen len)); train_group_size 2
SIZES = {
    "tiny": ({}, (16, 64, 64, 8, 96)),
    "100m": (dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                  num_kv_heads=4, head_dim=64), (4, 64, 128, 2, 256)),
}
GROUP = 2


def make_config(size):
  c = tiny.get_config()
  overrides, (bq, lq, lp, bg, lg) = SIZES[size]
  for k, v in overrides.items():
    c.model[k] = v
  c.model.scan_layers, c.model.remat_policy, c.model.matmul_impl = args.scan, "none", args.matmul
  d = c.data
  d.embedding_batch_size, d.query_max_len, d.passage_max_len = bq, lq, lp
  d.generative_batch_size, d.generative_max_len, d.train_group_size = bg, lg, GROUP
  c.loss.temperature, c.loss.pooling = 0.02, "mean"
  return c


def make_batch(c, seed=0):
  rng = np.random.default_rng(seed)
  d, V = c.data, c.model.vocab_size

  def rows(n, length):
    ids = rng.integers(3, V, (n, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return ids * mask, mask

  q_ids, q_mask = rows(d.embedding_batch_size, d.query_max_len)
  p_ids, p_mask = rows(d.embedding_batch_size * GROUP, d.passage_max_len)
  g_ids, g_mask = rows(d.generative_batch_size, d.generative_max_len)
  labels = np.where(g_mask > 0, g_ids, -100).astype(np.int32)
  labels[:, :8] = -100  # the prompt part is not trained on
  return dict(query_ids=q_ids, query_mask=q_mask, query_pool_mask=q_mask, passage_ids=p_ids, passage_mask=p_mask,
              passage_pool_mask=p_mask, gen_ids=g_ids, gen_mask=g_mask, gen_labels=labels)


def time_ours(c, batch):
  state, step, b = ready_train_step(ModelConfig(**c.model.to_dict()), c, batch, devices=jax.devices()[:1])
  first, times, _, _, metrics = time_train_steps(state, step, b, args.steps)
  return statistics.median(times), first, float(metrics["loss"])


def time_torch(c, batch):
  step = make_torch_step(c, GROUP)
  losses = []
  times = wall_times(lambda: losses.append(step(batch)), args.steps)
  return statistics.median(times), losses[-1]


print(f"jax {jax.__version__}, torch {torch.__version__} ({args.threads} threads), transformers "
      f"{transformers.__version__}; {os.cpu_count()} CPU cores; float32; ours: "
      f"{'scanned' if args.scan else 'unrolled'} layers, matmul_impl={args.matmul}")
peak = matmul_flops()[0]
print(f"plain jitted 2048x2048 float32 matmul: {peak / 1e9:.1f} GFLOP/s")
for size in args.sizes:
  c = make_config(size)
  batch = make_batch(c)
  flops = mfu.grit_step_flops_from_config(c).total
  ours, first, loss_ours = time_ours(c, batch)
  theirs, loss_theirs = time_torch(c, batch)
  n_params = sum(np.prod(s) for s in [(c.model.vocab_size, c.model.hidden_size)] * 2) + c.model.num_layers * (
      mfu.matmul_params_per_layer(c.model))
  d = c.data
  print(f"[{size}] ~{n_params / 1e6:.0f}M params; batch {d.embedding_batch_size}q x {d.query_max_len} + "
        f"{d.embedding_batch_size * GROUP}p x {d.passage_max_len} + {d.generative_batch_size}g x "
        f"{d.generative_max_len}; {flops / 1e9:.1f} GFLOP/step")
  print(f"  grit_jax: {ours * 1e3:.1f} ms/step (first step incl. compile {first:.1f} s), loss {loss_ours:.3f}; "
        f"{flops / ours / 1e9:.1f} GFLOP/s = {flops / ours / peak:.0%} of the matmul")
  print(f"  torch:    {theirs * 1e3:.1f} ms/step, loss {loss_theirs:.3f}")
  ratio = theirs / ours
  print(f"  speed-up ours vs torch: {ratio:.2f}x", "PASS" if ratio >= 1.3 else "FAIL", "(target >= 1.3x)")
