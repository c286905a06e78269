"""`grit-jax embed | generate | rag`: thin command-line front ends over grit_jax.inference.

  grit-jax embed    --model DIR --input texts.jsonl --output emb.npy [--instruction "..."]
  grit-jax generate --model DIR --prompt "..." [--prompt "..."] [--max-new-tokens N --temperature T --top-p P]
  grit-jax rag      --model DIR --corpus docs.jsonl --query "..." --cache doc [--index DIR]

JSONL rows are a JSON string or an object with "text" (and optionally "title"). Bad input raises GritJaxError
naming the file and line; outputs are written to a temporary name and renamed, so nothing half-written remains.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from grit_jax.errors import GritJaxError
from grit_jax.fileio import atomic_write


def read_texts(path: str, allow_title: bool = False) -> list:
  """Rows of a JSONL file: strings, or {"text": ..., "title": ...} (title joined only when `allow_title`)."""
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise GritJaxError(f"{path}: cannot open ({e.strerror})") from e
  rows = []
  with f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise GritJaxError(f"{path}:{n}: invalid JSON ({e.msg})") from e
      if isinstance(row, dict) and isinstance(row.get("text"), str):
        title = row.get("title", "")
        if not isinstance(title, str):
          raise GritJaxError(f"{path}:{n}: key 'title' must be a string")
        text = (title + " " + row["text"]).strip() if allow_title and title else row["text"]
      elif isinstance(row, str):
        text = row
      else:
        raise GritJaxError(f"{path}:{n}: expected a JSON string or an object with a string 'text' key")
      if not text.strip():
        raise GritJaxError(f"{path}:{n}: empty text")
      rows.append(text)
  if not rows:
    raise GritJaxError(f"{path}: no texts")
  return rows


def save_npy_atomic(path: str, array: np.ndarray) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise GritJaxError(f"--output {path}: folder {folder} does not exist")
  atomic_write(path, lambda f: np.save(f, array), "wb")


def _load(path: str):
  from grit_jax.inference.gritlm import GritLM
  if not os.path.isdir(path):
    raise GritJaxError(f"--model {path}: not a directory")
  return GritLM.from_pretrained(path)


def embed_main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="grit-jax embed", description="Embed a JSONL of texts into a .npy matrix.")
  p.add_argument("--model", required=True)
  p.add_argument("--input", required=True, help="JSONL: one string or {'text': ...} per line")
  p.add_argument("--output", required=True, help=".npy file, float32 [N, D]")
  p.add_argument("--instruction", default="")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--max-length", type=int, default=512)
  p.add_argument("--pooling", default="mean", choices=("mean", "weightedmean", "lasttoken"))
  p.add_argument("--no-normalize", action="store_true")
  a = p.parse_args(argv)
  texts = read_texts(a.input)
  if not a.output.endswith(".npy"):
    raise GritJaxError(f"--output {a.output}: expected a .npy path")
  from grit_jax.inference.encode import encode
  emb = encode(_load(a.model), texts, instruction=a.instruction, batch_size=a.batch_size,
               max_length=a.max_length, pooling=a.pooling, normalize=not a.no_normalize)
  save_npy_atomic(a.output, emb)
  print(f"wrote {a.output}: {emb.shape[0]} x {emb.shape[1]} float32")
  return 0


def generate_main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="grit-jax generate", description="Generate chat replies.")
  p.add_argument("--model", required=True)
  p.add_argument("--prompt", required=True, action="append", help="a user message (repeat for a batch)")
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  from grit_jax.inference.generate import generate
  outs = generate(_load(a.model), a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                  top_p=a.top_p, seed=a.seed)
  for prompt, out in zip(a.prompt, outs):
    print(out if len(outs) == 1 else f"### {prompt}\n{out}\n")
  return 0


def rag_main(argv: list[str]) -> int:
  from grit_jax.inference import rag as rag_lib
  p = argparse.ArgumentParser(prog="grit-jax rag", description="Retrieve from a corpus and answer (KV caching).")
  p.add_argument("--model", required=True)
  p.add_argument("--corpus", help="JSONL of documents (string or {'title', 'text'}); not needed with an --index")
  p.add_argument("--query", required=True, action="append")
  p.add_argument("--cache", default="doc", choices=rag_lib.MODES)
  p.add_argument("--index", help="index folder: loaded when it exists, else built from --corpus and saved there")
  p.add_argument("--prompt", default="query", choices=tuple(rag_lib.FULL_FORMATS),
                 help="plain-RAG prompt format (--cache none)")
  p.add_argument("--max-new-tokens", type=int, default=16)
  p.add_argument("--max-length", type=int, default=4096)
  a = p.parse_args(argv)
  model = _load(a.model)
  if a.index and os.path.exists(os.path.join(a.index, "index.json")):
    index = rag_lib.RagIndex.load(a.index)
  elif a.corpus:
    index = rag_lib.build_index(model, read_texts(a.corpus, allow_title=True), max_length=a.max_length,
                                with_cache=a.cache in ("doc", "doc_query") or bool(a.index))
    if a.index:
      index.save(a.index)
  else:
    raise GritJaxError("--corpus is required unless --index names an existing index")
  results = rag_lib.rag(model, a.query, index, cache=a.cache, max_new_tokens=a.max_new_tokens, prompt=a.prompt,
                        max_length=a.max_length)
  for q, r in zip(a.query, results):
    print(f"query: {q}\nretrieved [{r.doc_index}] (score {r.score:.4f}): {r.document[:200]}\nanswer: {r.answer}\n")
  return 0
