"""Hard-negative mining over a corpus index (`grit-jax mine`): each training row's query is searched in the index
and its `neg` replaced by the documents at ranks [range_min, range_max), best first, skipping its positives (by
text: a corpus row whose embedded "title text" or bare text is a positive) and every candidate within `margin` of
the positive's score (relative: score > pos * (1 - margin); absolute: score > pos - margin), as
sentence-transformers' mine_hard_negatives does. The corpus side is `grit-jax index` (resumable); queries and
positives are embedded again on each run (they are a training file, not a corpus).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from grit_jax.data import jsonl
from grit_jax.data.corpus import document_text
from grit_jax.errors import GritJaxError
from grit_jax.inference import corpus_index as ci

MARGIN_TYPES = ("relative", "absolute")
TEACHER_KEYS = ("pos_scores", "neg_scores")


def entry_parts(x) -> tuple[str, str]:
  """(instruction, text) of a query / passage entry as written: [instruction, text] or a text (checked on reading)."""
  return ("", x) if isinstance(x, str) else (x[0], x[1])


def read_rows(path: str) -> list[dict]:
  """The embedding rows of a training JSONL ({"query", "pos", "neg"?}) as written, read and checked as training
  reads them (data/jsonl.py: a BOM, bad UTF-8, a bad row: one error naming file:line)."""
  if not os.path.isfile(path):
    raise GritJaxError(f"--data {path}: no such file")
  rows = [obj for _, obj, _ in jsonl.read_objects(path, jsonl.EMBEDDING, policy="error", stats=jsonl.BadInputStats(),
                                                  group_size=1)]
  if not rows:
    raise GritJaxError(f"{path}: no rows")
  return rows


def mine(model, rows: Sequence[dict], index: ci.CorpusIndex, negatives: int = 7, range_min: int = 0,
         range_max: int = 50, margin: float = 0.0, margin_type: str = "relative") -> tuple[list[dict], int]:
  """(the rows with mined `neg`, how many got fewer than `negatives`)."""
  if margin_type not in MARGIN_TYPES:
    raise GritJaxError(f"--margin-type {margin_type}: expected one of {MARGIN_TYPES}")
  if not 0 <= range_min < range_max or negatives < 1:
    raise GritJaxError(f"--range-min {range_min} / --range-max {range_max} / --negatives {negatives}: need "
                       "0 <= range-min < range-max and negatives >= 1")
  queries = [entry_parts(r["query"]) for r in rows]
  positives = [entry_parts(r["pos"][0]) for r in rows]
  q_QD = _embed(model, index, queries)
  p_QD = _embed(model, index, positives)
  pos_Q = np.einsum("qd,qd->q", q_QD, p_QD)
  found_QK, scores_QK = index.search(q_QD, range_max)
  out, short = [], 0
  for row, pos, found, scores in zip(rows, pos_Q, found_QK, scores_QK):
    limit = pos * (1 - margin) if margin_type == "relative" else pos - margin
    pos_texts = {entry_parts(p)[1] for p in row["pos"]}
    instruction = entry_parts(row["pos"][0])[0]
    neg = []
    for r, s in list(zip(found, scores))[range_min:]:
      if len(neg) == negatives:
        break
      if r < 0 or s > limit:
        continue
      doc = index.row(int(r))
      text = document_text(doc, f"index {index.path}: row {r}")  # as embedded: a positive may be titled there
      if text not in pos_texts and doc["text"] not in pos_texts:
        neg.append([instruction, text] if isinstance(row["pos"][0], list) else text)
    short += len(neg) < negatives
    # a teacher scored the old candidates: its neg_scores would be paired with the mined texts (and pos_scores alone
    # is refused on reading), so both go; the command reports how many rows lost them
    out.append({k: v for k, v in row.items() if k not in TEACHER_KEYS} | {"neg": neg})
  return out, short


def _embed(model, index, items: Sequence[tuple[str, str]]) -> np.ndarray:
  """Embeddings of (instruction, text) pairs, one pass per instruction, in input order."""
  out = None
  for instruction in dict.fromkeys(i for i, _ in items):
    idx = [j for j, (i, _) in enumerate(items) if i == instruction]
    emb = ci.embed_queries(model, index, [items[j][1] for j in idx], instruction)
    out = np.zeros((len(items), emb.shape[1]), np.float32) if out is None else out
    out[idx] = emb
  return out
