"""GRIT step on the shipped data, same examples per step: grit_jax with packed passes vs the PyTorch reference path
(transformers + the GritLM loss, each batch padded to its longest row, as the reference's collator does), one run,
examples per second. Target: >= 2x. Also grit_jax padded to max length (the default before packing).

  .venv/bin/python bench/packing_vs_torch.py [--steps 8] [--lengths 128 512 512] [--batch 16 8] [--hidden 256 --layers 4]

float32 on CPU, one device; AdamW + clipping on both sides; median step time over --steps steps (different real
batches) after a warm-up step per compiled shape.
"""
import argparse
import os
import statistics

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=8)
p.add_argument("--lengths", type=int, nargs=3, default=[128, 512, 512], help="query / passage / generative max")
p.add_argument("--batch", type=int, nargs=2, default=[16, 8],
               help="queries, generative samples per step (32 16 needs more than the 24 GiB of the project's host)")
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--layers", type=int, default=4)
args = p.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from _common import ready_train_step, wall_times  # noqa: E402  (also puts the repo on sys.path)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from torch_reference import make_torch_step, trim_to_longest  # noqa: E402

from configs import tiny  # noqa: E402
from grit_jax import data as data_lib  # noqa: E402
from grit_jax.modeling import ModelConfig  # noqa: E402

GROUP = 2


def recipe(packed: bool):
  c = tiny.get_config()
  m = c.model
  m.hidden_size, m.intermediate_size, m.num_layers = args.hidden, 4 * args.hidden, args.layers
  m.num_heads, m.num_kv_heads, m.head_dim = args.hidden // 64, max(args.hidden // 256, 1), 64
  m.remat_policy = "none"
  d = c.data
  d.query_max_len, d.passage_max_len, d.generative_max_len = args.lengths
  d.embedding_batch_size, d.generative_batch_size, d.train_group_size = *args.batch, GROUP
  d.batching = "mixed"
  d.pack_embedding = d.pack_generative = packed
  c.loss.temperature = 0.02
  return c


def batches(c, n):
  it = data_lib.make_train_iterator(c.data)
  out = [next(it) for _ in range(n)]
  return out, it


def time_ours(c, bs):
  state, step, _ = ready_train_step(ModelConfig(**c.model.to_dict()), c, devices=jax.devices()[:1])
  mesh = step.mesh
  box = {"state": state}
  warmed, times = set(), []
  for b in bs:
    shape = tuple(sorted((k, v.shape) for k, v in b.items()))
    g = data_lib.to_global_batch(b, mesh)
    run = lambda g=g: _one(box, step, g)
    if shape not in warmed:  # compile outside the timed steps (one per shape)
      wall_times(run, 0, warmup=1)
      warmed.add(shape)
    times += wall_times(run, 1, warmup=0)
  # the losses are after len(bs) + len(warmed) updates (each warm-up trains too): compare them at equal counts
  return statistics.median(times), len(warmed), float(box["m"]["loss"])


def _one(box, step, g):
  box["state"], box["m"] = step(box["state"], g)
  return box["m"]


def time_torch(c, bs):
  step = make_torch_step(c, GROUP)
  losses = []
  trimmed = [trim_to_longest(b) for b in bs]
  step(trimmed[0])  # warm-up
  times = [wall_times(lambda b=b: losses.append(step(b)), 1, warmup=0)[0] for b in trimmed]
  return statistics.median(times), losses[-1]


n = args.steps
padded, _ = batches(recipe(False), n)
packed, it = batches(recipe(True), n)
ex = args.batch[0] + args.batch[1]  # examples per step: queries (with their passages) + generative samples
print(f"jax {jax.__version__}; {os.cpu_count()} CPU cores; model d={args.hidden} x {args.layers} layers, vocab "
      f"{recipe(False).model.vocab_size}; per step {args.batch[0]} queries x (1 + {GROUP}) + {args.batch[1]} "
      f"generative, lengths {args.lengths}, shipped data; {n} steps")
print(it.packer.report())
eff = {k: np.mean([(b[f"{k}_segment_ids"] > 0).mean() for b in packed]) for k in ("query", "passage", "gen")}
longest = {k: np.mean([b[f"{k}_mask"].mean() / (b[f"{k}_mask"].sum(1).max() / b[f"{k}_mask"].shape[1])
                       for b in padded]) for k in ("query", "passage", "gen")}
print("token-slot efficiency  packed: " + "  ".join(f"{k} {v:.1%}" for k, v in eff.items())
      + "   torch (longest row): " + "  ".join(f"{k} {v:.1%}" for k, v in longest.items()))
ours_packed, shapes, loss_packed = time_ours(recipe(True), packed)
ours_padded, _, loss_padded = time_ours(recipe(False), padded)
theirs, loss_torch = time_torch(recipe(False), padded)
print(f"grit_jax packed:      {ours_packed * 1e3:8.1f} ms/step = {ex / ours_packed:7.1f} examples/s ({shapes} compiled "
      f"shape(s)), loss {loss_packed:.3f} after {n + shapes} updates")
print(f"grit_jax padded:      {ours_padded * 1e3:8.1f} ms/step = {ex / ours_padded:7.1f} examples/s, loss {loss_padded:.3f} after {n + 1} updates")
print(f"torch, longest row:   {theirs * 1e3:8.1f} ms/step = {ex / theirs:7.1f} examples/s, loss {loss_torch:.3f} after {n + 1} updates (its own init)")
ratio = theirs / ours_packed
print(f"packed grit_jax vs torch: {ratio:.2f}x examples/s", "PASS" if ratio >= 2 else "FAIL", "(target >= 2x)")
