"""seqio Tasks over the tfds JSONL builds of the eval folder: tokenized GritLM examples with documented, fixed
feature shapes (training reads its builds directly: grit_jax.data.iterator).

Registered per (eval folder, kind, tokenizer, lengths, group size, policy) as `grit_jax_eval_<kind>_<fingerprint>`.
Features (int32, right-padded; the batch keys of grit_jax.common_types):
  embedding:  query_ids / query_mask / query_pool_mask        [Lq]
              passage_ids / passage_mask / passage_pool_mask  [g, Lp]   (positive first, then g-1 negatives)
  generative: gen_ids / gen_mask / gen_labels                 [Lg]      (labels unshifted, IGNORE ignored)
Each example also carries `dataset` (file index) and `line` (1-based line number) scalars for provenance.
Each takes the first positive and the first negatives (no sampling: the same eval batches every time).
Tokenization runs the same python code (grit_jax.data.batching) as the numpy training iterator. Multi-host:
`get_dataset(shard_info=seqio.ShardInfo(index, num_shards))`.
"""
from __future__ import annotations

import seqio
import tensorflow as tf

from grit_jax import common_types as ct
from grit_jax.data import batching, jsonl, tfds_builders

_EMB_KEYS = ct.padded_keys(ct.QUERY) + ct.padded_keys(ct.PASSAGE)
_GEN_KEYS = ct.padded_keys(ct.GEN)
_EMB_RAW = ("query_instruction", "query", "pos_instructions", "pos", "neg_instructions", "neg")


def _raw_signature(kind: str) -> dict:
  s, v = tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.string)
  common = {"dataset": tf.TensorSpec([], tf.int32), "line": tf.TensorSpec([], tf.int32)}
  if kind == jsonl.EMBEDDING:
    return dict(common, query_instruction=s, query=s, pos_instructions=v, pos=v, neg_instructions=v, neg=v)
  return dict(common, turns=v, chat=tf.TensorSpec([], tf.bool))


def _source(ds, kind: str) -> seqio.DataSource:
  """seqio source reading the tfds build in index order (array_record: via its random-access data source)."""
  signature = _raw_signature(kind)

  def generate():
    for start in range(0, len(ds), 256):
      for rec in ds.records(range(start, min(start + 256, len(ds)))):
        yield {k: rec[k] for k in signature}

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del split, shuffle_files, seed  # one split; shuffling is the Task's (shuffle buffer) or the sampler's job
    return tf.data.Dataset.from_generator(generate, output_signature=signature)

  return seqio.FunctionDataSource(dataset_fn, splits=["train"], num_input_examples={"train": len(ds)})


def _featurizer(kind: str, tokenizer, data_cfg):
  q_len, p_len = int(data_cfg.query_max_len), int(data_cfg.passage_max_len)
  g_len, group = int(data_cfg.generative_max_len), int(data_cfg.train_group_size)

  def to_str(x):
    return x.decode("utf-8") if isinstance(x, bytes) else [v.decode("utf-8") for v in x]

  if kind == jsonl.EMBEDDING:
    def featurize_np(*raw):
      rec = {k: to_str(v) for k, v in zip(_EMB_RAW, raw)}
      f = batching.embedding_features(tokenizer, rec, query_max_len=q_len, passage_max_len=p_len,
                                      group_size=group, rng=None)
      return tuple(f[k] for k in _EMB_KEYS)

    shapes = {**{k: [q_len] for k in ct.padded_keys(ct.QUERY)},
              **{k: [group, p_len] for k in ct.padded_keys(ct.PASSAGE)}}

    @seqio.map_over_dataset
    def featurize(ex):
      outs = tf.numpy_function(featurize_np, [ex[k] for k in _EMB_RAW], [tf.int32] * len(_EMB_KEYS))
      out = {k: tf.ensure_shape(o, shapes[k]) for k, o in zip(_EMB_KEYS, outs)}
      return dict(out, dataset=ex["dataset"], line=ex["line"])  # provenance, passed through
  else:
    def featurize_np(turns, chat):
      f = batching.generative_features(tokenizer, {"turns": to_str(turns), "chat": bool(chat)},
                                       generative_max_len=g_len)
      return tuple(f[k] for k in _GEN_KEYS)

    @seqio.map_over_dataset
    def featurize(ex):
      outs = tf.numpy_function(featurize_np, [ex["turns"], ex["chat"]], [tf.int32] * len(_GEN_KEYS))
      out = {k: tf.ensure_shape(o, [g_len]) for k, o in zip(_GEN_KEYS, outs)}
      return dict(out, dataset=ex["dataset"], line=ex["line"])
  return featurize


def register_tasks(data_cfg, split: str = "eval", tokenizer=None, cache_dir: str | None = None) -> dict[str, str]:
  """Builds the tfds datasets of `data_cfg.eval_dir` for the kinds of `data_cfg.mode` that it has and registers one
  seqio Task per kind. Returns {kind: task name}."""
  from grit_jax.data.tokenizer import Tokenizer

  if split != "eval":
    raise ValueError(f"split={split!r}: only the eval split is registered (training reads the tfds builds "
                     "directly: grit_jax.data.iterator)")
  tokenizer = tokenizer if tokenizer is not None else Tokenizer(data_cfg.tokenizer)
  folder = data_cfg.eval_dir
  present = jsonl.split_files(folder)  # held-out data may cover only one side of a unified run
  kinds = tuple(k for k in tfds_builders.mode_kinds(data_cfg) if present[k]) or tfds_builders.mode_kinds(data_cfg)
  datasets = tfds_builders.load_datasets(data_cfg, folder, tokenizer.path, cache_dir, kinds)
  names = {}
  for kind, ds in datasets.items():
    keys = _EMB_KEYS if kind == jsonl.EMBEDDING else _GEN_KEYS
    fp = ds.builder.builder_config.name.split("_")[-1]
    name = f"grit_jax_{split}_{kind}_{fp}"
    if name not in seqio.TaskRegistry.names():
      rank = {k: 2 if k in ct.padded_keys(ct.PASSAGE) else 1 for k in keys}
      seqio.TaskRegistry.add(
          name, source=_source(ds, kind),
          output_features={k: seqio.Feature(tokenizer.vocabulary, add_eos=False, dtype=tf.int32, rank=rank[k])
                           for k in keys},
          preprocessors=[_featurizer(kind, tokenizer, data_cfg)],
          shuffle_buffer_size=1000)
    names[kind] = name
  return names


def num_examples(task_name: str) -> int:
  return int(seqio.get_mixture_or_task(task_name).source.num_input_examples("train"))


def task_numpy(task_name: str, shard_index: int = 0, num_shards: int = 1, shuffle: bool = False,
               seed: int | None = None):
  """Numpy examples of a registered task (this shard's share, via seqio.ShardInfo)."""
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(sequence_length=None, split="train", shuffle=shuffle, seed=seed,
                        shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
                        trim_output_features=False)
  return ds.as_numpy_iterator()
