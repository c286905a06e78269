"""RAG latency on CPU: Doc Caching vs plain RAG for a long document and a one-token query (paper Table 7, Sample A).

  .venv/bin/python bench/rag_latency.py [--doc-tokens 4000] [--runs 10] [--preset tiny_mistral]

Timed as the paper: query embedding + top-1 search + generation of exactly 16 tokens (eos ignored); the document's
cache is built at index time and not timed; compilation is excluded (every path is warmed up first). Plain RAG
puts the document first (the reference's "doc" prompt), the comparison the paper's 63% figure is about.
The paper measured 14.18 s -> 5.25 s (63% less time) for GritLM-7B on a Xeon CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from _common import wall_times  # noqa: E402  (also puts the repo on sys.path)

import jax  # noqa: E402
import numpy as np  # noqa: E402


def long_document(tok, n_tokens: int, seed: int = 0) -> str:
  """Random words from the tokenizer's vocabulary until the text is ~n_tokens long."""
  rng = np.random.default_rng(seed)
  pieces = [tok.id_to_piece(i).replace("\u2581", "") for i in range(3, tok.vocab_size)]
  words = [p for p in pieces if p.isalpha() and len(p) > 2]
  text = ""
  while True:
    text += " ".join(rng.choice(words, size=200)) + " "
    if len(tok.encode("<s><|embed|>\n" + text)) >= n_tokens:
      break
  ids = tok.encode(text)
  return tok.decode(ids[:n_tokens - 8])


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="tiny_mistral")
  p.add_argument("--tokenizer", default="data/tokenizer.model")
  p.add_argument("--doc-tokens", type=int, default=4000)
  p.add_argument("--new-tokens", type=int, default=16)
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--hidden-size", type=int, help="override the preset (e.g. 512 with --layers 8: a bigger model)")
  p.add_argument("--layers", type=int)
  a = p.parse_args(argv)

  from grit_jax.data.tokenizer import Tokenizer
  from grit_jax.inference import rag as rag_lib
  from grit_jax.inference import rag_index
  from grit_jax.inference.gritlm import GritLM
  from grit_jax.modeling import get_config, init_params

  tok = Tokenizer(a.tokenizer)
  over = {}
  if a.hidden_size:
    heads = max(4, a.hidden_size // 64)
    over.update(hidden_size=a.hidden_size, intermediate_size=int(3.5 * a.hidden_size), num_heads=heads,
                num_kv_heads=max(1, heads // 4), head_dim=a.hidden_size // heads)
  if a.layers:
    over["num_layers"] = a.layers
  cfg = get_config(a.preset, dtype="float32", max_position_embeddings=max(8192, 2 * a.doc_tokens), **over)
  params = init_params(cfg, jax.random.PRNGKey(0))
  model = GritLM(cfg, params, tok)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

  doc = long_document(tok, a.doc_tokens)
  docs = [doc, long_document(tok, a.doc_tokens, seed=1)]  # whichever is retrieved is long
  query = "a"  # one token after the template
  index = rag_index.build_index(model, docs, with_cache=True, max_length=a.doc_tokens + 64)  # not timed
  print(f"model {a.preset}: {n_params / 1e6:.2f}M params, {cfg.num_layers} layers, d={cfg.hidden_size}; "
        f"document {len(tok.encode('<s><|embed|>' + chr(10) + doc))} tokens; query {query!r}; "
        f"{a.new_tokens} new tokens; {jax.devices()[0].platform}, {os.cpu_count()} cores")

  def run(mode):
    prompt = "doc" if mode == "none" else "query"
    r = rag_lib.rag(model, query, index, cache=mode, max_new_tokens=a.new_tokens, prompt=prompt,
                    max_length=a.doc_tokens + 64, stop_at_eos=False)
    assert r.doc_index in (0, 1)
    return r

  from grit_jax.inference import generate as gen
  times = {}
  for mode in ("none", "doc"):
    run(mode), run(mode)  # compile + warm caches
    traced = dict(gen.TRACE_COUNTS)
    ts = wall_times(lambda: run(mode), a.runs, warmup=0)
    times[mode] = statistics.median(ts)
    assert gen.TRACE_COUNTS == traced, "a timed run recompiled"
    print(f"  {'plain RAG (doc first)' if mode == 'none' else 'Doc Caching':<22} median {times[mode]:.4f} s "
          f"(min {min(ts):.4f}, max {max(ts):.4f}, {a.runs} runs)")
  reduction = 1 - times["doc"] / times["none"]
  print(f"Doc Caching takes {100 * reduction:.1f}% less time than plain RAG (paper, CPU: 63%)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
