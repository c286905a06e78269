"""`grit-jax eval --model DIR --data DIR_OR_JSONL`: retrieval metrics of a model on the user's own rows.

The rows are in the training data's embedding format (`{"query": [instr, text] | text, "pos": [...], "neg": [...]}`,
data/jsonl.py; any bad row is an error naming file:line, before the model is loaded). The corpus is every distinct
passage (instruction, text) of the rows, positives and hard negatives alike; each query is relevant to its own
positives. Queries and passages are embedded with their own instructions (GritLM template), scored by cosine, and
ranked; the metrics are the usual binary-relevance ones, computed by pytrec_eval (as MTEB): nDCG@10, recall@1/5/10
and MRR@10, averaged over queries (objectives.retrieval_metrics).
"""
from __future__ import annotations

import os

import numpy as np

from grit_jax.errors import GritJaxError
from grit_jax.objectives import retrieval_metrics  # noqa: F401 (pytrec_eval; also the trainer's eval)



def read_rows(path: str) -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]], list[tuple[str, str]]]:
  """(queries [(instr, text)], positives per query, corpus [(instr, text)] = every distinct pos/neg passage) of a
  JSONL file or of the embedding files of a folder."""
  from grit_jax.data import jsonl
  if os.path.isdir(path):
    files = jsonl.split_files(path)[jsonl.EMBEDDING]
    if not files:
      raise GritJaxError(f"--data {path}: no embedding JSONL (rows with \"query\", \"pos\", \"neg\") in the folder")
  elif os.path.isfile(path):
    files = [path]
  else:
    raise GritJaxError(f"--data {path}: no such file or folder")
  queries, positives, corpus, index = [], [], [], {}
  for f in files:
    stats = jsonl.BadInputStats()
    for _, row in jsonl.read_file(f, jsonl.EMBEDDING, policy="error", stats=stats, group_size=1):
      queries.append(row["query"])
      positives.append(row["pos"])
      for passage in row["pos"] + row["neg"]:
        if passage not in index:
          index[passage] = len(corpus)
          corpus.append(passage)
  if not queries:
    raise GritJaxError(f"--data {path}: no rows")
  return queries, positives, corpus


def embed_pairs(model, pairs: list[tuple[str, str]], **encode_kwargs) -> np.ndarray:
  """Embeddings [N, D] of (instruction, text) pairs, one encode call per distinct instruction, in input order."""
  out = np.zeros((len(pairs), encode_kwargs.get("dim") or model.config.hidden_size), np.float32)
  by_instruction: dict[str, list[int]] = {}
  for i, (instruction, _) in enumerate(pairs):
    by_instruction.setdefault(instruction, []).append(i)
  for instruction, idx in by_instruction.items():
    out[idx] = model.encode([pairs[i][1] for i in idx], instruction=instruction, **encode_kwargs)
  return out


def evaluate(model, queries, positives, corpus, batch_size: int = 64, max_length: int | None = None,
             packing: bool | None = None, dim: int | None = None) -> dict[str, float]:
  """The metrics `grit-jax eval` and the demo report. max_length: None = the model's embedding max length
  (GritLM.max_length: the lengths it was trained with; a model trained on short texts ranks worse at 512);
  packing: as GritLM.encode (None = packed rows where they cost fewer FLOPs; same metrics either way); dim: the
  embeddings' first `dim` components, re-normalised (Matryoshka; None = all). Texts cut to the max length are
  reported once."""
  index = {p: i for i, p in enumerate(corpus)}
  kw = dict(batch_size=batch_size, max_length=model.max_length(max_length), normalize=True, packing=packing, dim=dim)
  with model.truncation_report():
    q_QD, d_ND = embed_pairs(model, queries, **kw), embed_pairs(model, corpus, **kw)
  metrics = retrieval_metrics(q_QD @ d_ND.T, [{index[p] for p in pos} for pos in positives])
  return dict(metrics, queries=len(queries), corpus=len(corpus))
