"""Corpus encoding, packed rows vs padded batches (grit_jax.inference.encode), on the shipped data's passages: every
distinct passage of data/train's embedding rows (with its instruction, as `grit-jax eval` embeds them), tokenized
with data/tokenizer.model, the tiny model (random weights: the work, not the values, matters here), one CPU
device. Prints token-slot efficiency and passages/s of each layout, their ratio, and the largest difference between
the two layouts' embeddings (they must agree to 1e-5).

  .venv/bin/python bench/encode_packing.py [--max-length 512] [--batch-size 64] [--runs 5] [--width 1]
  .venv/bin/python bench/encode_packing.py --model mistral_7b --flops-only   # slots and FLOPs only, no weights

--width w scales the tiny model's hidden and intermediate sizes by w, --head-dim sets the head size (heads = hidden /
head_dim). Packed rows save the padding's matmuls but attend over whole rows: on the tiny model (head_dim 16) the
attention, slow per FLOP on a CPU, outweighs the saving at 512-token rows; wider models with 7B-like heads gain.
"""
import argparse
import os
import types

p = argparse.ArgumentParser()
p.add_argument("--max-length", type=int, default=512)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--runs", type=int, default=5)
p.add_argument("--model", default="tiny_mistral", help="a grit_jax.modeling preset")
p.add_argument("--width", type=int, default=1, help="hidden / intermediate size times this")
p.add_argument("--head-dim", type=int, default=None, help="heads = hidden / head_dim (default: the preset's)")
p.add_argument("--flops-only", action="store_true", help="token slots and model FLOPs of each layout, no timing")
args = p.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import _common  # noqa: E402  (puts the repository on sys.path)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from grit_jax.data.tokenizer import Tokenizer  # noqa: E402
from grit_jax.inference import encode as enc  # noqa: E402
from grit_jax.inference.gritlm import GritLM  # noqa: E402
from grit_jax.inference.retrieval_eval import read_rows  # noqa: E402
from grit_jax.modeling import get_config, init_params  # noqa: E402

_, _, passages = read_rows("data/train")
base = get_config(args.model)
head_dim = args.head_dim or base.head_dim
heads = base.hidden_size * args.width // head_dim
cfg = get_config(args.model, dtype="float32", hidden_size=base.hidden_size * args.width,
                 intermediate_size=base.intermediate_size * args.width, num_heads=heads,
                 num_kv_heads=max(1, heads * base.num_kv_heads // base.num_heads), head_dim=head_dim)
tokenizer = Tokenizer("data/tokenizer.model")
tokens = []
for instruction in sorted({i for i, _ in passages}):
  texts = [t for i, t in passages if i == instruction]
  tokens += enc.tokenize(types.SimpleNamespace(tokenizer=tokenizer), texts, instruction, args.max_length)
lengths = np.array([len(ids) for ids, _ in tokens])
devices = jax.devices()[:1]
print(f"{len(tokens)} passages, tokens mean {lengths.mean():.0f} median {np.median(lengths):.0f} "
      f"max {lengths.max()} (max_length {args.max_length}), batch_size {args.batch_size}, {args.model}: "
      f"{cfg.num_layers} layers x {cfg.hidden_size} ({cfg.num_heads} heads x {cfg.head_dim})")

# the three layouts' shapes: padded batches, every text packed, the default (packing=None)
padded_shapes = lambda ls: enc.padded_shapes(ls, args.batch_size, args.max_length)
row_len = enc.choose_row_len(cfg, lengths, args.batch_size, args.max_length)
layout, units = enc.plan_packed(lengths, args.batch_size, enc.packed_row_len(lengths, args.max_length), len(devices))
calls = -(-len(units) // layout.units)
flops = {"padded": enc.layout_flops(cfg, padded_shapes(lengths)),
         "packed": enc.layout_flops(cfg, [(layout.units, layout.row_len)] * calls)}
if row_len is None:
  flops["default"] = flops["padded"]
else:
  d_layout, d_units = enc.plan_packed(lengths[lengths <= row_len], args.batch_size, row_len, len(devices))
  flops["default"] = enc.layout_flops(cfg, [(d_layout.units, row_len)] * -(-len(d_units) // d_layout.units)) + \
      enc.layout_flops(cfg, padded_shapes(lengths[lengths > row_len]))
print(f"token-slot efficiency: padded {enc.padded_efficiency(lengths, args.batch_size, args.max_length):.1%}, "
      f"packed {lengths.sum() / (calls * layout.slots):.1%} ({calls} calls of {layout.units} rows x {layout.row_len} "
      f"tokens, <= {layout.per_unit} texts a row)")
print(f"default (packing=None): rows of {row_len} tokens for the texts that fit, the rest padded (None = all padded)")
print(f"model FLOPs vs padded (every key of a row counted): packed {flops['packed'] / flops['padded']:.2f}, "
      f"default {flops['default'] / flops['padded']:.2f}")
if args.flops_only:
  raise SystemExit(0)

model = GritLM(cfg, init_params(cfg, jax.random.PRNGKey(0)), tokenizer)
out, best = {}, {}
layouts = (("padded", False), ("packed", True), ("default", None))
runs = {name: (lambda p=packing: enc.encode_tokens(model, tokens, args.batch_size, args.max_length, devices=devices,
                                                    packing=p, show_progress_bar=False)) for name, packing in layouts}
for name, run in runs.items():
  out[name] = run()  # compiles
for _ in range(args.runs):  # interleaved, best of runs: the host is shared, load comes and goes
  for name, run in runs.items():
    best[name] = min(best.get(name, float("inf")), min(_common.wall_times(run, 1, warmup=0)))
rate = {name: len(tokens) / t for name, t in best.items()}
for name in runs:
  print(f"{name:>8}: {rate[name]:.1f} passages/s, max |emb - padded| = {np.abs(out[name] - out['padded']).max():.1e}")
print(f"throughput vs padded ({jax.default_backend()} x1): packed {rate['packed'] / rate['padded']:.2f}x, "
      f"default {rate['default'] / rate['padded']:.2f}x")
