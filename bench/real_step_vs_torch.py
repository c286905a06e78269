"""The GRIT step on a real pretrained model (SmolLM2-135M-Instruct, configs/smollm2.py) with the shipped data:
grit_jax's packed step vs the PyTorch reference path (transformers' LlamaForCausalLM loaded from the same
directory + the GritLM loss, each batch padded to its longest row as the reference's collator does). Same examples
per step (the recipe's 8 queries x (1 positive + 1 hard negative) + 4 chats), float32 compute on both sides (the
recipe's bf16 is switched off so both do the same arithmetic; no remat on either side), AdamW + clipping, one CPU
device. Median step time over --steps real batches after a warm-up step per compiled shape. Target: >= 2x
examples/s.

  .venv/bin/python bench/real_step_vs_torch.py [--steps 6]
"""
import argparse
import os
import statistics

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=6)
p.add_argument("--pack-levels", type=int, default=None, help="data.pack_levels (default: configs/base.py's ladder; "
               "the demo recipe's 1 compiles one shape)")
args = p.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from _common import ready_train_step, wall_times  # noqa: E402  (also puts the repo on sys.path)

import jax  # noqa: E402
from torch_reference import make_torch_step, trim_to_longest  # noqa: E402

from configs import base, smollm2  # noqa: E402
from grit_jax import contract  # noqa: E402
from grit_jax import data as data_lib  # noqa: E402


def recipe(packed: bool):
  c = smollm2.get_config()
  c.model.dtype, c.model.remat_policy = "float32", "none"
  c.data.pack_embedding = c.data.pack_generative = packed
  c.data.pack_levels = args.pack_levels or base.get_config("tiny_mistral").data.pack_levels
  c.data.tokenizer = contract.tokenizer_path(c.data.tokenizer)  # the GGUF -> its converted folder, as the trainer
  return c


def slots(bs, trim):
  """Real tokens / token slots computed, over all passes of all steps."""
  real = total = 0
  for b in bs:
    b = trim_to_longest(b) if trim else b
    for name in ("query", "passage", "gen"):
      ids = b[f"{name}_ids"]
      real += int((b[f"{name}_segment_ids"] > 0).sum() if f"{name}_segment_ids" in b else b[f"{name}_mask"].sum())
      total += ids.size
  return real, total


def batches(c, n):
  it = data_lib.make_train_iterator(c.data)
  return [next(it) for _ in range(n)]


def time_ours(c, bs):
  model = contract.model_config(c, log=None)
  state, step, _ = ready_train_step(model, c, devices=jax.devices()[:1])
  box, warmed, times = {"state": state}, set(), []
  for b in bs:
    g = data_lib.to_global_batch(b, step.mesh)

    def run(g=g):
      box["state"], box["m"] = step(box["state"], g)
      return box["m"]

    shape = tuple(sorted((k, v.shape) for k, v in b.items()))
    if shape not in warmed:  # compile outside the timed steps (one per shape)
      wall_times(run, 0, warmup=1)
      warmed.add(shape)
    times += wall_times(run, 1, warmup=0)
  return statistics.median(times), len(warmed)


def time_torch(c, bs):
  _, src = contract.init_source(c.init_from)
  step = make_torch_step(c, c.data.train_group_size, model_dir=src)
  trimmed = [trim_to_longest(b) for b in bs]
  step(trimmed[0])  # warm-up
  return statistics.median(wall_times(lambda b=b: step(b), 1, warmup=0)[0] for b in trimmed)


n = args.steps
c = recipe(True)
packed, padded = batches(c, n), batches(recipe(False), n)
ex = c.data.embedding_batch_size + c.data.generative_batch_size
print(f"jax {jax.__version__}; {os.cpu_count()} CPU cores; SmolLM2-135M-Instruct float32; per step "
      f"{c.data.embedding_batch_size} queries x {c.data.train_group_size} passages + {c.data.generative_batch_size} "
      f"chats, lengths {c.data.query_max_len}/{c.data.passage_max_len}/{c.data.generative_max_len}; {n} steps")
for label, bs, trim in (("grit_jax packed", packed, False), ("torch, longest row", padded, True)):
  real, total = slots(bs, trim)
  print(f"{label}: {real} real tokens in {total} token slots ({real / total:.1%})")
ours, shapes = time_ours(c, packed)
theirs = time_torch(recipe(False), padded)
print(f"grit_jax packed:    {ours:6.2f} s/step = {ex / ours:5.2f} examples/s ({shapes} compiled shape(s))")
print(f"torch, longest row: {theirs:6.2f} s/step = {ex / theirs:5.2f} examples/s")
ratio = theirs / ours
print(f"packed grit_jax vs torch: {ratio:.2f}x examples/s", "PASS" if ratio >= 2 else "FAIL", "(target >= 2x)")
