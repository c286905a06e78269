"""The eval batches of `config.data.eval_dir` (`make_eval_iterator`, re-exported as grit_jax.data's): finite,
deterministic, the same number of batches on every process, the last ones completed with weight-0 filler rows."""
from __future__ import annotations

import math

import numpy as np

from grit_jax import common_types as ct
from grit_jax.common_types import IGNORE
from grit_jax.data import batching, jsonl
from grit_jax.data.iterator import check_cfg


def _filler(kind: str, data_cfg, tokenizer) -> dict[str, np.ndarray]:
  """A weight-0 row: all padding, no labels (its loss and accuracy terms are masked out by the weights)."""
  if kind == jsonl.EMBEDDING:
    q, p, g = int(data_cfg.query_max_len), int(data_cfg.passage_max_len), int(data_cfg.train_group_size)
    row = {ct.QUERY_IDS: np.full([q], tokenizer.pad_id, np.int32), ct.QUERY_MASK: np.zeros([q], np.int32),
           ct.PASSAGE_IDS: np.full([g, p], tokenizer.pad_id, np.int32), ct.PASSAGE_MASK: np.zeros([g, p], np.int32)}
    # One real token (BOS) keeps masked means finite for consumers that do not look at the weight.
    row[ct.QUERY_IDS][0] = row[ct.PASSAGE_IDS][:, 0] = tokenizer.bos_id
    row[ct.QUERY_MASK][0] = row[ct.PASSAGE_MASK][:, 0] = 1
    row[ct.QUERY_POOL_MASK] = row[ct.QUERY_MASK].copy()
    row[ct.PASSAGE_POOL_MASK] = row[ct.PASSAGE_MASK].copy()
    return row
  n = int(data_cfg.generative_max_len)
  ids = np.full([n], tokenizer.pad_id, np.int32)
  ids[0] = tokenizer.bos_id
  return {ct.GEN_IDS: ids, ct.GEN_MASK: (np.arange(n) == 0).astype(np.int32),
          ct.GEN_LABELS: np.full([n], IGNORE, np.int32)}


def make_eval_iterator(data_cfg, tokenizer=None, shard_index: int = 0, num_shards: int = 1,
                       cache_dir: str | None = None, embedding_batch_size: int | None = None,
                       generative_batch_size: int | None = None):
  """Finite list of this process's eval batches over `data_cfg.eval_dir`, read through the seqio eval tasks.

  Deterministic passages (first positive, first negatives). Every process gets the same number of batches;
  the last ones are completed with filler rows whose weight is 0: batches carry `query_weight` [Bq] and
  `gen_weight` [Bg] (1 = real example) besides the training keys, and filler rows have all gen_labels IGNORE.
  Only the kinds of `data_cfg.mode` that eval_dir has are included (an embedding-only eval folder gives batches
  without gen_* keys).
  """
  from grit_jax.data import tasks
  from grit_jax.data.tokenizer import Tokenizer

  check_cfg(data_cfg, num_shards, shard_index)
  tokenizer = tokenizer if tokenizer is not None else Tokenizer(data_cfg.tokenizer)
  names = tasks.register_tasks(data_cfg, split="eval", tokenizer=tokenizer,
                               cache_dir=cache_dir or data_cfg.cache_dir)
  sizes = {jsonl.EMBEDDING: int(embedding_batch_size or data_cfg.embedding_batch_size) // num_shards,
           jsonl.GENERATIVE: int(generative_batch_size or data_cfg.generative_batch_size) // num_shards}
  per_kind, num_batches = {}, 0
  for kind, name in names.items():
    examples = list(tasks.task_numpy(name, shard_index=shard_index, num_shards=num_shards))
    total = tasks.num_examples(name)
    per_kind[kind] = examples
    num_batches = max(num_batches, math.ceil(math.ceil(total / num_shards) / sizes[kind]))
  batches = []
  for b in range(num_batches):
    batch = {}
    for kind, examples in per_kind.items():
      size = sizes[kind]
      chunk = examples[b * size:(b + 1) * size]
      weight = np.array([1] * len(chunk) + [0] * (size - len(chunk)), np.int32)  # [B]
      filler = _filler(kind, data_cfg, tokenizer)
      chunk = chunk + [filler] * (size - len(chunk))
      if kind == jsonl.EMBEDDING:
        batch.update(batching.stack_embedding(chunk), **{ct.key(ct.QUERY, ct.WEIGHT): weight})
      else:
        batch.update(batching.stack_generative(chunk), **{ct.key(ct.GEN, ct.WEIGHT): weight})
    batches.append(batch)
  return batches
