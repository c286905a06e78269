"""Deterministic, resumable, shardable training iterator (numpy sampling over indices of the tfds builds).

Global batches are a pure function of (seed, stream, epoch): every epoch is a fresh seeded permutation, so the
iterator state is just a few integers per stream and a resumed run yields exactly the uninterrupted run's batches.
Every process computes the same global batch of indices and reads, tokenizes and yields only its own rows
(rows [p*B/P, (p+1)*B/P) for shard p of P), so the per-process batches assemble into the global batch with
`to_global_batch` and the global batch does not depend on the number of processes.

Embedding stream: with `batching="same_dataset"` (the reference's CustomRandomSampler) each dataset's permutation
is cut into full global batches, the leftovers of all datasets are shuffled together into mixed batches, the final
partial batch is dropped (the reference's dataloader_drop_last), and the batch order is shuffled: a step's dataset
is drawn in proportion to the dataset's size (floor(n_d / B) of each epoch's batches are dataset d's), without
replacement within an epoch. `batching="mixed"`: one permutation of all rows cut into batches.
Per query, besides its passages: no_in_batch_neg (its file is in data.no_in_batch_negatives) and, when any file
has them, the teacher scores of its sampled positive and negatives (NaN for the rows of files without).
Generative stream: one permutation per epoch cut into global batches.
The two streams run their epochs independently (the smaller one wraps around first, like the reference's refill).
Packing (config.data.pack_embedding / pack_generative; grit_jax.data.packing) changes only where the sequences of
these same batches sit: whole sequences packed into fixed-shape rows per device share.
The index sampling: data/sampler.py; the eval batches: data/eval_iterator.py.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from grit_jax import common_types as ct
from grit_jax.common_types import IGNORE
from grit_jax.data import batching, jsonl, packing, tfds_builders
from grit_jax.data.sampler import Stream
from grit_jax.errors import GritJaxError

STATE_VERSION = 1
_EMB, _GEN = 0, 1  # stream ids in the seeds


def check_cfg(data_cfg, num_shards: int, shard_index: int) -> None:
  """What only the iterator knows: the process sharding. The rest of config.data is grit_jax.contract's."""
  emb, gen = ct.passes(data_cfg.mode)
  if not 0 <= shard_index < num_shards:
    raise GritJaxError(f"shard_index={shard_index} is not in [0, {num_shards})")
  for key, used in (("embedding_batch_size", emb), ("generative_batch_size", gen)):
    if used and int(data_cfg[key]) % num_shards:
      raise GritJaxError(f"config.data.{key}={data_cfg[key]} (global) is not divisible by {num_shards} processes")


class TrainIterator:
  """Infinite iterator of this process's share of each global training batch (see the module docstring)."""

  def __init__(self, data_cfg, tokenizer=None, shard_index: int = 0, num_shards: int = 1,
               cache_dir: str | None = None, *, batch_shards: int = 1, chunks: tuple[int, int] = (1, 1)):
    """batch_shards: the devices the global batch is split over (packing units; a multiple of num_shards);
    chunks: (GradCache chunks of the embedding batch, generative micro-batches): packed rows divide into them."""
    from grit_jax.data.tokenizer import Tokenizer

    check_cfg(data_cfg, num_shards, shard_index)
    self.tokenizer = tokenizer if tokenizer is not None else Tokenizer(data_cfg.tokenizer)
    self.shard_index, self.num_shards = int(shard_index), int(num_shards)
    self.seed = int(data_cfg.seed)
    self.q_len, self.p_len = int(data_cfg.query_max_len), int(data_cfg.passage_max_len)
    self.g_len, self.group = int(data_cfg.generative_max_len), int(data_cfg.train_group_size)
    self.pack = {"emb": bool(data_cfg.pack_embedding),
                 "gen": bool(data_cfg.pack_generative)}
    cache_dir = cache_dir or data_cfg.cache_dir
    self.datasets = tfds_builders.load_datasets(data_cfg, data_cfg.train_dir, self.tokenizer.path, cache_dir,
                                                tfds_builders.mode_kinds(data_cfg))
    self.stats = jsonl.BadInputStats()
    for ds in self.datasets.values():
      self.stats.merge(ds.stats)
    # Texts cut to their max length, this process's rows, since this iterator was made.
    self.truncated = {"truncated_query": 0, "truncated_passage": 0, "truncated_gen": 0}
    self.texts = {"truncated_query": 0, "truncated_passage": 0, "truncated_gen": 0}
    self.emb = self.gen = None
    if jsonl.EMBEDDING in self.datasets:
      self.emb_batch = int(data_cfg.embedding_batch_size)
      self.emb = Stream(self.datasets[jsonl.EMBEDDING], self.emb_batch, self.seed, _EMB,
                         data_cfg.batching == "same_dataset", "embedding data")
      self.no_in_batch = self._no_in_batch_datasets(data_cfg)
      self.scored = any(self.emb.ds.scored)
    if jsonl.GENERATIVE in self.datasets:
      self.gen_batch = int(data_cfg.generative_batch_size)
      ds = self.datasets[jsonl.GENERATIVE]
      self.gen = Stream(ds, self.gen_batch, self.seed, _GEN, False, "generative data")
    self.step = 0
    self.packer = self._make_packer(data_cfg, batch_shards, chunks)
    self._fingerprint = {
        "seed": self.seed, "num_shards": self.num_shards, "shard_index": self.shard_index,
        "datasets": {k: ds.builder.builder_config.content_fingerprint for k, ds in self.datasets.items()},
        "batch": [int(data_cfg.embedding_batch_size), int(data_cfg.generative_batch_size)],
    }

  def __iter__(self):
    return self

  def _local(self, indices: np.ndarray, global_batch: int) -> np.ndarray:
    b = global_batch // self.num_shards
    return indices[self.shard_index * b:(self.shard_index + 1) * b]

  def _no_in_batch_datasets(self, data_cfg) -> np.ndarray | None:
    """Dataset indices of the files of data.no_in_batch_negatives (None when it is empty)."""
    names = tuple(data_cfg.no_in_batch_negatives)
    if not names:
      return None
    files = [os.path.basename(f) for f in self.emb.ds.files]
    for name in names:
      if name not in files:
        raise GritJaxError(f"config.data.no_in_batch_negatives: {name!r} is not an embedding file of "
                           f"{data_cfg.train_dir!r} (embedding files: {', '.join(files)})")
    return np.array([files.index(n) for n in names], np.int64)

  def _query_rows(self, indices, scores: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The per-query batch keys of these examples besides pos_key: no_in_batch_neg [n], teacher_scores [n, g]."""
    out = {}
    if self.no_in_batch is not None:
      out[ct.NO_IN_BATCH_NEG] = np.isin(self.emb.ds.dataset_of(np.asarray(indices)), self.no_in_batch).astype(np.int32)
    if self.scored:
      out[ct.TEACHER_SCORES] = np.stack(scores).astype(np.float32)  # [n, g]
    return out

  def _emb_sequences(self, epoch: int, indices) -> list[tuple]:
    out = []
    for i, rec in zip(indices, self.emb.ds.records(indices)):
      # Per-example sampling seed: independent of the shard layout, so the global batch is the same for any P.
      rng = np.random.default_rng([self.seed, _EMB, epoch, int(i)])
      out.append(batching.embedding_sequences(self.tokenizer, rec, query_max_len=self.q_len,
                                              passage_max_len=self.p_len, group_size=self.group, rng=rng))
    return out

  def _embedding_batch(self) -> dict[str, np.ndarray]:
    epoch, indices = self.emb.next()
    local = self._local(indices, self.emb_batch)
    feats = []
    for i, rec in zip(local, self.emb.ds.records(local)):
      # Per-example sampling seed: independent of the shard layout, so the global batch is the same for any P.
      rng = np.random.default_rng([self.seed, _EMB, epoch, int(i)])
      feats.append(batching.embedding_features(self.tokenizer, rec, query_max_len=self.q_len,
                                               passage_max_len=self.p_len, group_size=self.group, rng=rng))
    self._count("truncated_query", sum(f[ct.key(ct.QUERY, ct.TRUNCATED)] for f in feats), len(feats))
    self._count("truncated_passage", sum(f["passages_truncated"] for f in feats), len(feats) * self.group)
    rows = self._query_rows(local, [f.pop(ct.TEACHER_SCORES) for f in feats])
    return dict(batching.stack_embedding(feats), **rows)

  def _generative_batch(self) -> dict[str, np.ndarray]:
    _, indices = self.gen.next()
    local = self._local(indices, self.gen_batch)
    feats = [batching.generative_features(self.tokenizer, rec, generative_max_len=self.g_len)
             for rec in self.gen.ds.records(local)]
    self._count("truncated_gen", sum(f[ct.key(ct.GEN, ct.TRUNCATED)] for f in feats), len(feats))
    return batching.stack_generative(feats)

  # -- packing (grit_jax.data.packing) -----------------------------------------------------------------------------

  def _pass_sequences(self, kind: str, epoch: int, indices) -> dict[str, list[dict]]:
    """{pass: unpadded sequences (dicts of 1-D lists) in batch order} of the given examples."""
    if kind == "emb":
      q, p, scores = [], [], []
      for query, passages, teacher in self._emb_sequences(epoch, indices):
        q.append({ct.IDS: query[0], ct.POOL_MASK: query[1], ct.TRUNCATED: query.truncated})
        p += [{ct.IDS: e[0], ct.POOL_MASK: e[1], ct.TRUNCATED: e.truncated} for e in passages]
        scores.append(teacher)
      return {ct.QUERY: q, ct.PASSAGE: p, ct.TEACHER_SCORES: scores}
    gen = []
    for rec in self.gen.ds.records(indices):
      toks = batching.generative_tokens(self.tokenizer, rec, self.g_len)
      ids, labels = toks
      # The first token is never a target; IGNORE there also keeps the row's previous sequence from predicting it.
      gen.append({ct.IDS: ids, ct.LABELS: [IGNORE] + list(labels[1:]), ct.TRUNCATED: toks.truncated})
    return {ct.GEN: gen}

  def _make_packer(self, data_cfg, batch_shards: int, chunks: tuple[int, int]):
    kinds = [k for k in ("emb", "gen") if self.pack[k] and {"emb": self.emb, "gen": self.gen}[k] is not None]
    if not kinds:
      return None
    if batch_shards % self.num_shards:
      raise GritJaxError(f"packing: {batch_shards} batch shards do not split over {self.num_shards} processes")
    return packing.StepPacker(self.pack_layouts(data_cfg, kinds, batch_shards, chunks), self.shard_index,
                              self.num_shards)

  def sample_lengths(self, kind: str, limit: int = packing.STAT_EXAMPLES) -> dict[str, list[np.ndarray]]:
    """{pass: [token lengths of each batch pool]} of up to `limit` examples in the sampler's first-epoch order
    (passages sampled as in training). Pools: one per dataset when batches are drawn from one dataset each
    (batching="same_dataset": their lengths go together), else one."""
    stream = self.emb if kind == "emb" else self.gen
    order = np.random.default_rng([self.seed, _EMB if kind == "emb" else _GEN, 0]).permutation(len(stream.ds))
    order = order[:limit]
    seqs = self._pass_sequences(kind, 0, order)
    seqs.pop(ct.TEACHER_SCORES, None)
    per_pool = (stream.ds.dataset_of(order) if stream.single_dataset and len(stream.ds.counts) > 1
                else np.zeros(len(order), np.int64))
    out = {}
    for name, v in seqs.items():
      lengths = np.array([len(s[ct.IDS]) for s in v])
      owner = np.repeat(per_pool, len(v) // len(order))  # g passages per example
      out[name] = [lengths[owner == d] for d in np.unique(owner)]
    return out

  def pack_layouts(self, data_cfg, kinds, batch_shards: int, chunks: tuple[int, int]) -> dict:
    """{pass: PassLayout} of the packed kinds ("emb", "gen") for the batch sizes of `data_cfg`: levels derived from
    this iterator's data (rows set in config kept) (`grit-jax aot` asks with the recipe's batch sizes)."""
    examples = {"emb": int(data_cfg.embedding_batch_size), "gen": int(data_cfg.generative_batch_size)}
    per_example = {ct.QUERY: 1, ct.PASSAGE: self.group, ct.GEN: 1}
    specs, lengths = {}, {}
    for kind in kinds:
      pools = self.sample_lengths(kind)
      lengths.update(packing.sample_batches(
          {name: [p.reshape(-1, per_example[name]) for p in v] for name, v in pools.items()}, examples[kind],
          self.seed))
      for name in pools:
        key = {ct.GEN: "generative"}.get(name, name)  # config.data's name of the pass
        max_len = {ct.QUERY: self.q_len, ct.PASSAGE: self.p_len, ct.GEN: self.g_len}[name]
        pack_len = int(data_cfg[f"{key}_pack_len"]) or max_len
        if pack_len < max_len:
          raise GritJaxError(f"config.data.{key}_pack_len={pack_len} is below {key}_max_len={max_len}: a sequence of "
                             "max length would not fit a row")
        specs[name] = packing.PassSpec(units=batch_shards, num_sequences=examples[kind] * per_example[name],
                                       pack_len=pack_len, rows=int(data_cfg[f"{key}_pack_rows"]),
                                       chunks=chunks[0 if kind == "emb" else 1])
    return packing.make_layouts(specs, lengths, levels=int(data_cfg.pack_levels),
                                headroom=float(data_cfg.pack_headroom))

  def _packed_batch(self) -> dict[str, np.ndarray]:
    """Every process reads the whole global batch of the packed kinds (the shape choice needs every unit's
    lengths) and keeps its own units."""
    seqs, rows = {}, {}
    for kind, stream in (("gen", self.gen), ("emb", self.emb)):
      if stream is not None and self.pack[kind]:
        epoch, indices = stream.next()
        seqs.update(self._pass_sequences(kind, epoch, indices))
        if kind == "emb":
          rows = self._query_rows(indices, seqs.pop(ct.TEACHER_SCORES))
    for name, v in seqs.items():  # count this process's share, as the padded batches do
      n = len(v) // self.num_shards
      local = v[self.shard_index * n:(self.shard_index + 1) * n]
      self._count(f"truncated_{name}", sum(bool(x[ct.TRUNCATED]) for x in local), len(local))
    pad = self.tokenizer.pad_id
    pads = {name: {ct.IDS: pad, ct.LABELS: IGNORE} if name == ct.GEN else {ct.IDS: pad, ct.POOL_MASK: 0}
            for name in seqs}
    out = self.packer.pack(seqs, pads)
    if ct.PASSAGE in seqs:  # this process's queries: the contiguous share its units hold
      positives = [s[ct.IDS] for s in seqs[ct.PASSAGE][::self.group]]
      n = len(positives) // self.num_shards
      out[ct.POS_KEY] = batching.positive_keys(positives[self.shard_index * n:(self.shard_index + 1) * n])
      out.update({k: v[self.shard_index * n:(self.shard_index + 1) * n] for k, v in rows.items()})
    return out

  def _count(self, key: str, truncated: int, texts: int) -> None:
    self.truncated[key] += int(truncated)
    self.texts[key] += int(texts)

  def truncation_counts(self) -> dict[str, int]:
    """{truncated_query, truncated_passage, truncated_gen}: this process's texts cut to their max length so far
    (training logs them with the metrics)."""
    return dict(self.truncated)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = {}
    if self.packer is not None:
      batch.update(self._packed_batch())
    if self.gen is not None and not self.pack["gen"]:
      batch.update(self._generative_batch())
    if self.emb is not None and not self.pack["emb"]:
      batch.update(self._embedding_batch())
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: the next batch this iterator yields."""
    return {"version": STATE_VERSION, "step": self.step, "fingerprint": self._fingerprint,
            "emb": self.emb.get_state() if self.emb else None, "gen": self.gen.get_state() if self.gen else None}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise GritJaxError(f"data iterator state: unknown format {str(state)[:120]}")
    if state.get("fingerprint") != self._fingerprint:
      raise GritJaxError("data iterator state was saved for different data/seed/batch/sharding: "
                         f"saved {state.get('fingerprint')}, now {self._fingerprint}")
    self.step = int(state["step"])
    if self.emb:
      self.emb.set_state(state["emb"])
    if self.gen:
      self.gen.set_state(state["gen"])

  def report(self) -> str:
    return self.stats.report() + ("\n" + self.packer.report() if self.packer is not None else "")


def truncation_report(truncated: dict[str, int], texts: dict[str, int]) -> str:
  """One line: how many texts of each pass were cut to the max length (empty when none was)."""
  names = {"truncated_query": "queries", "truncated_passage": "passages", "truncated_gen": "generative sequences"}
  parts = [f"{truncated[k]} of {texts[k]} {name} ({truncated[k] / texts[k]:.1%})" for k, name in names.items()
           if texts.get(k) and truncated.get(k)]
  return f"truncated to the max length: {', '.join(parts)}" if parts else ""


def make_train_iterator(data_cfg, tokenizer=None, shard_index: int = 0, num_shards: int = 1,
                        cache_dir: str | None = None, **packing_kw) -> TrainIterator:
  """The training iterator of `config.data` (see TrainIterator; packing_kw: batch_shards, chunks)."""
  return TrainIterator(data_cfg, tokenizer, shard_index, num_shards, cache_dir, **packing_kw)

