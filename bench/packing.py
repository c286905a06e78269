"""Token-slot efficiency (text tokens / token slots) of each pass on the shipped data: padded to max length,
padded to the batch's longest row (what the PyTorch reference computes), and packed (grit_jax.data.packing), over
the same batches, at the tiny recipe's lengths and at the paper's (256 / 2048 / 2048). Target: >= 90% packed.

  .venv/bin/python bench/packing.py [--steps 40] [--units 1 8 32]

--units: packing units (devices sharing the global batch; the 7B recipe on v5p-64 has 32): more units = fewer
sequences per unit = more fragmentation, and the unit that needs most rows sets every unit's rows. Shapes come from
the ladder derived as in training (grit_jax.data.packing: config.data.pack_levels levels + the one-sequence-per-row
fallback); the bracket counts the steps at each level.
"""
import argparse
import os

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
p.add_argument("--units", type=int, nargs="+", default=[1, 8, 32])
args = p.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import _common  # noqa: E402,F401  (puts the repository on sys.path)

import numpy as np  # noqa: E402

from configs import gritlm_7b, tiny  # noqa: E402
from grit_jax import data as data_lib  # noqa: E402

PASSES = ("query", "passage", "gen")


def recipe(name):
  c = tiny.get_config() if name == "tiny" else gritlm_7b.get_config()
  d = c.data
  d.train_dir, d.tokenizer = "data/train", "data/tokenizer.model"
  if name == "paper":  # the paper's lengths; batches the shipped data holds (307 embedding, 307 chat examples)
    d.embedding_batch_size, d.generative_batch_size, d.batching = 256, 64, "mixed"
  return c


def efficiency(config, units, packed):
  d = config.data
  d.pack_embedding = d.pack_generative = packed
  it = data_lib.make_train_iterator(d, batch_shards=units)
  text, slots, longest = dict.fromkeys(PASSES, 0), dict.fromkeys(PASSES, 0), dict.fromkeys(PASSES, 0)
  for _ in range(args.steps):
    b = next(it)
    for name in PASSES:
      real = b[f"{name}_segment_ids"] > 0 if packed else b[f"{name}_mask"] > 0
      text[name] += int(real.sum())
      slots[name] += real.size
      if not packed:  # the reference pads each batch to its longest row
        longest[name] += real.shape[0] * int(real.sum(1).max())
  out = {n: text[n] / slots[n] for n in PASSES}
  if not packed:
    out.update({f"{n}_longest": text[n] / longest[n] for n in PASSES})
  return out, (it.packer.report() if packed else "")


for name in ("tiny", "paper"):
  c = recipe(name)
  d = c.data
  print(f"== {name}: lengths {d.query_max_len}/{d.passage_max_len}/{d.generative_max_len}, batch "
        f"{d.embedding_batch_size} queries x {d.train_group_size} + {d.generative_batch_size} generative; "
        f"pack lens {d.query_pack_len or d.query_max_len}/{d.passage_pack_len or d.passage_max_len}/"
        f"{d.generative_pack_len or d.generative_max_len}; {args.steps} steps")
  pad, _ = efficiency(recipe(name), 1, False)
  print("padded to max length:    " + "  ".join(f"{n} {pad[n]:6.1%}" for n in PASSES))
  print("padded to longest row:   " + "  ".join(f"{n} {pad[n + '_longest']:6.1%}" for n in PASSES))
  for u in args.units:
    try:
      eff, report = efficiency(recipe(name), u, True)
    except Exception as e:  # noqa: BLE001 - e.g. a batch that does not split over u units
      print(f"packed, {u:3d} units:       n/a ({e})")
      continue
    print(f"packed, {u:3d} units:       " + "  ".join(f"{n} {eff[n]:6.1%}" for n in PASSES)
          + f"   [{report.splitlines()[-1]}]")
