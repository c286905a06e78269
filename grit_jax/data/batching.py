"""Examples -> fixed-shape numpy features, batches, and global jax arrays (packing: grit_jax.data.packing).

Every array is int32 and right-padded to the configured max length (fixed shapes: the jitted step compiles once).
Shared by the seqio tasks (grit_jax.data.tasks) and the numpy sampler (grit_jax.data.iterator), so both produce
the same features from the same record.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np

from grit_jax import common_types as ct
from grit_jax.common_types import IGNORE
from grit_jax.data import templates
from grit_jax.errors import GritJaxError

BATCHINGS = ("mixed", "same_dataset")  # config.data.batching (the embedding sampler: grit_jax.data.iterator)


def pad_row(ids: Sequence[int], length: int, value: int = 0) -> np.ndarray:
  out = np.full([length], value, np.int32)  # [L]
  n = min(len(ids), length)
  out[:n] = ids[:n]
  return out


def sample_passages(rec: dict, group_size: int, rng: np.random.Generator | None) -> list[tuple[str, str, float]]:
  """1 positive + (group_size-1) hard negatives, as the reference: a random positive; negatives sampled without
  replacement, from the list repeated when it is shorter than needed. rng=None: first positive, first negatives
  (cycled) -- the deterministic choice used for evaluation. Each comes as (instruction, text, teacher score), the
  score NaN when the record has none."""
  def candidates(key):
    scores = rec.get(f"{key}_scores")
    scores = scores if scores is not None and len(scores) else [math.nan] * len(rec[key])
    return list(zip(rec[f"{key}_instructions"], rec[key], (float(v) for v in scores)))
  pos, neg = candidates("pos"), candidates("neg")
  n_neg = group_size - 1
  if rng is None:
    chosen = [pos[0]] + [neg[i % len(neg)] for i in range(n_neg)]
  else:
    chosen = [pos[int(rng.integers(len(pos)))]]
    if n_neg:
      pool = neg * math.ceil(n_neg / len(neg))
      chosen += [pool[int(i)] for i in rng.choice(len(pool), n_neg, replace=False)]
  return chosen


def embedding_sequences(tokenizer, rec: dict, *, query_max_len: int, passage_max_len: int, group_size: int,
                        rng: np.random.Generator | None) -> tuple[tuple, list[tuple], np.ndarray]:
  """Unpadded ((query ids, pool mask), [(passage ids, pool mask)] * g, teacher scores [g] float32 (NaN: none)) of
  one record (passages: `sample_passages`)."""
  query = templates.encode_embedding(tokenizer, rec["query_instruction"], rec["query"], query_max_len)
  chosen = sample_passages(rec, group_size, rng)
  return (query, [templates.encode_embedding(tokenizer, instr, text, passage_max_len) for instr, text, _ in chosen],
          np.array([score for _, _, score in chosen], np.float32))


def embedding_features(tokenizer, rec: dict, *, query_max_len: int, passage_max_len: int, group_size: int,
                       rng: np.random.Generator | None) -> dict[str, np.ndarray]:
  """query_{ids,mask,pool_mask} [Lq], passage_{ids,mask,pool_mask} [g, Lp] and teacher_scores [g] (NaN: none) of
  one record, and how many of its texts were cut to the max length (query_truncated 0/1, passages_truncated 0..g;
  not batch keys)."""
  query, passages, scores = embedding_sequences(tokenizer, rec, query_max_len=query_max_len,
                                                passage_max_len=passage_max_len, group_size=group_size, rng=rng)
  q_ids, q_pool = query
  out = {ct.QUERY_IDS: pad_row(q_ids, query_max_len, tokenizer.pad_id),
         ct.QUERY_MASK: pad_row([1] * len(q_ids), query_max_len),
         ct.QUERY_POOL_MASK: pad_row(q_pool, query_max_len), ct.key(ct.QUERY, ct.TRUNCATED): int(query.truncated),
         ct.TEACHER_SCORES: scores}
  out.update(passage_ids=np.stack([pad_row(ids, passage_max_len, tokenizer.pad_id) for ids, _ in passages]),
             passage_mask=np.stack([pad_row([1] * len(ids), passage_max_len) for ids, _ in passages]),
             passage_pool_mask=np.stack([pad_row(pool, passage_max_len) for _, pool in passages]),
             passages_truncated=sum(p.truncated for p in passages))
  return out


def generative_tokens(tokenizer, rec: dict, max_len: int) -> templates.Encoded:
  """(ids, labels) of one generative record, unpadded, at most max_len long (`.truncated`: it was cut)."""
  if rec["chat"]:
    return templates.encode_chat(tokenizer, rec["turns"], max_len)
  return templates.encode_plain(tokenizer, rec["turns"][0], max_len)


def generative_features(tokenizer, rec: dict, *, generative_max_len: int) -> dict[str, np.ndarray]:
  toks = generative_tokens(tokenizer, rec, generative_max_len)
  ids, labels = toks
  return {ct.GEN_IDS: pad_row(ids, generative_max_len, tokenizer.pad_id),
          ct.GEN_MASK: pad_row([1] * len(ids), generative_max_len),
          ct.GEN_LABELS: pad_row(labels, generative_max_len, IGNORE),
          ct.key(ct.GEN, ct.TRUNCATED): int(toks.truncated)}


def positive_keys(positives: Sequence[Sequence[int]]) -> np.ndarray:
  """[N, 2] int32: a 62-bit hash of each query's positive (its token ids as the model sees them). Two queries of a
  batch with equal keys share a positive text: the loss does not count it as a negative for either
  (objectives.contrastive_loss's pos_key)."""
  out = np.zeros([len(positives), 2], np.int32)  # [N, 2]
  for i, ids in enumerate(positives):
    digest = hashlib.blake2b(np.asarray(ids, np.int32).tobytes(), digest_size=8).digest()
    out[i] = np.frombuffer(digest, np.uint32).astype(np.int64) & 0x7FFFFFFF
  return out


def stack_embedding(features: list[dict]) -> dict[str, np.ndarray]:
  """Per-example features -> batch: queries [B, Lq], passages [B*g, Lp] (each query's group contiguous), pos_key
  [B, 2] (positive_keys), and no_in_batch_neg [B] / teacher_scores [B, g] when the features carry them."""
  row_keys = [k for k in (ct.NO_IN_BATCH_NEG, ct.TEACHER_SCORES) if k in features[0]]
  out = {k: np.stack([f[k] for f in features]) for k in ct.padded_keys(ct.QUERY) + tuple(row_keys)}
  for k in ct.padded_keys(ct.PASSAGE):
    out[k] = np.concatenate([f[k] for f in features], axis=0)  # [B*g, Lp]
  out[ct.POS_KEY] = positive_keys([f[ct.PASSAGE_IDS][0] for f in features])  # padded rows: equal texts, equal rows
  return out


def stack_generative(features: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([f[k] for f in features]) for k in ct.padded_keys(ct.GEN)}


def to_global_batch(batch_np: dict, mesh, batch_axes=("data", "fsdp")) -> dict:
  """Per-process numpy batches -> global jax.Arrays sharded over `batch_axes` on the leading dim.

  Each process passes its own share (rows [p*B/P, (p+1)*B/P) of the global batch, which is what the train
  iterator yields for shard_index=p); the global leading dim is the sum over processes.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  sharding = NamedSharding(mesh, P(axes if axes else None))
  ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  out = {}
  for k, v in batch_np.items():
    v = np.asarray(v)
    rows = v.shape[0] * jax.process_count()  # every process holds an equal share
    if rows % ways:
      raise GritJaxError(f"batch {k!r}: global batch dim {rows} is not divisible by the {ways} devices of mesh axes "
                         f"{axes}; change config.data.embedding_batch_size / generative_batch_size")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out

