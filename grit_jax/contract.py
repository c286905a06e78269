"""What a run is: the allowed values of every config section and one `validate(config)` that every entry point
(train, aot, the demo, the notebook) calls before it builds a mesh, reads data or loads weights.

The rules live here only. Model fields are checked by `ModelConfig` itself (it is also built from HF configs at
inference time); this module adds what ties the sections together: batch sizes against chunks, sub-batches and
devices, lengths against the model's positions, the tokenizer against the vocabulary, `init_from` against the
recipe's model. Every error is a GritJaxError naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import os

from grit_jax import common_types
# The shared vocabulary (data modes and their passes, the attn string, poolings) is stated in grit_jax.common_types.
from grit_jax.common_types import parse_attn
from grit_jax.errors import GritJaxError


def _passes(c) -> tuple[bool, bool]:
  """(embedding passes run, generative pass runs) for config.data.mode (common_types.passes)."""
  return common_types.passes(c.data.mode)


def architecture_fields() -> tuple[str, ...]:
  """Model fields that describe the network a checkpoint holds (ModelConfig's fields less its COMPUTE_FIELDS);
  with init_from=hf: they come from its config.json. The rest (dtype, remat, kernels, ...) are how this run computes
  and stay the recipe's."""
  from grit_jax.modeling.config import COMPUTE_FIELDS, ModelConfig
  return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in COMPUTE_FIELDS)


# -- checks --------------------------------------------------------------------------------------------------------

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int(section, name: str, lo: int, where: str) -> int:
  v = section[name]
  if not _is_int(v) or v < lo:
    raise GritJaxError(f"config.{where}.{name}={v!r}: must be an integer >= {lo}")
  return v


def _num(section, name: str, where: str, *, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False) -> float:
  v = section[name]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise GritJaxError(f"config.{where}.{name}={v!r}: must be a finite number")
  if lo is not None and (v < lo or (lo_open and v == lo)):
    raise GritJaxError(f"config.{where}.{name}={v!r}: must be {'>' if lo_open else '>='} {lo}")
  if hi is not None and (v > hi or (hi_open and v == hi)):
    raise GritJaxError(f"config.{where}.{name}={v!r}: must be {'<' if hi_open else '<='} {hi}")
  return v


def _bool(section, name: str, where: str) -> bool:
  v = section[name]
  if not isinstance(v, bool):
    raise GritJaxError(f"config.{where}.{name}={v!r}: must be True or False")
  return v


def _choice(section, name: str, allowed: tuple[str, ...], where: str) -> str:
  v = section[name]
  if v not in allowed:
    raise GritJaxError(f"config.{where}.{name}={v!r}: expected one of {', '.join(allowed)}")
  return v


def _check_data(c) -> None:
  d = c.data
  emb, gen = _passes(c)
  for name in ("query_max_len", "passage_max_len", "generative_max_len", "train_group_size"):
    _int(d, name, 1, "data")
  for name, used in (("embedding_batch_size", emb), ("generative_batch_size", gen)):
    v = _int(d, name, 0, "data")
    if used and v < 1:  # the unused one may be anything (0 in the ablation recipes): mode says it is unused
      raise GritJaxError(f"config.data.{name}={v}: must be >= 1 with data.mode={d.mode!r}")
  _bool(d, "pack_generative", "data")
  _bool(d, "pack_embedding", "data")
  for name in ("query", "passage", "generative"):  # grit_jax.data.packing
    length = _int(d, f"{name}_pack_len", 0, "data")
    if length and length < d[f"{name}_max_len"]:
      raise GritJaxError(f"config.data.{name}_pack_len={length}: below {name}_max_len={d[f'{name}_max_len']} "
                         "(a sequence of max length must fit a packed row); 0 = the max length")
    _int(d, f"{name}_pack_rows", 0, "data")
  _num(d, "pack_headroom", "data", lo=0.0)
  _int(d, "pack_levels", 1, "data")
  from grit_jax.data import batching, jsonl

  _choice(d, "batching", batching.BATCHINGS, "data")
  names = d.no_in_batch_negatives
  if not isinstance(names, tuple) or not all(isinstance(n, str) and n.endswith(".jsonl") and os.sep not in n
                                             for n in names):
    raise GritJaxError(f"config.data.no_in_batch_negatives={names!r}: expected a tuple of file names (*.jsonl) in "
                       "data.train_dir")
  _choice(d, "bad_input", jsonl.POLICIES, "data")
  _int(d, "seed", 0, "data")
  for name in ("train_dir", "eval_dir", "tokenizer", "cache_dir"):
    if not isinstance(d[name], str):
      raise GritJaxError(f"config.data.{name}={d[name]!r}: must be a path string")


def check_loss(l) -> None:
  """config.loss on its own (the train step checks it too when built without a whole recipe)."""
  from grit_jax import objectives

  _choice(l, "pooling", common_types.TOKEN_POOLINGS, "loss")
  _bool(l, "normalize", "loss")
  _num(l, "temperature", "loss", lo=0.0, lo_open=True)
  _num(l, "lambda_rep", "loss", lo=0.0)
  _num(l, "lambda_gen", "loss", lo=0.0)
  _choice(l, "lm_loss_mode", objectives.LM_MODES, "loss")
  _int(l, "lm_loss_sub_batches", 1, "loss")
  _num(l, "lm_token_factor", "loss", lo=0.0, lo_open=True)
  _choice(l, "contrastive_grad", objectives.CONTRASTIVE_GRADS, "loss")
  dims, weights = l.matryoshka_dims, l.matryoshka_weights
  if not isinstance(dims, tuple) or not all(_is_int(k) and k >= 1 for k in dims):
    raise GritJaxError(f"config.loss.matryoshka_dims={dims!r}: expected a tuple of positive integers, e.g. (64, 128, "
                       "256)")
  if any(b <= a for a, b in zip(dims, dims[1:])):
    raise GritJaxError(f"config.loss.matryoshka_dims={dims!r}: must be strictly increasing")
  if not isinstance(weights, tuple) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                               and math.isfinite(w) and w > 0 for w in weights):
    raise GritJaxError(f"config.loss.matryoshka_weights={weights!r}: expected a tuple of positive numbers")
  if weights and len(weights) != len(dims):
    raise GritJaxError(f"config.loss.matryoshka_weights={weights!r}: {len(weights)} weight(s) for "
                       f"{len(dims)} matryoshka_dims {dims!r} (or () for 1 each)")
  _num(l, "distill_weight", "loss", lo=0.0)
  _num(l, "distill_temperature", "loss", lo=0.0, lo_open=True)


def _check_loss(c) -> None:
  l = c.loss
  emb, gen = _passes(c)
  check_loss(l)
  if emb and gen:
    for name in ("lambda_rep", "lambda_gen"):
      if l[name] == 0:
        other = "generative" if name == "lambda_rep" else "embedding"
        raise GritJaxError(f"config.loss.{name}=0 with data.mode='unified' computes a pass that trains nothing; "
                           f"use data.mode={other!r}")
  sub = l.lm_loss_sub_batches
  if gen and c.data.generative_batch_size % sub:
    raise GritJaxError(f"config.loss.lm_loss_sub_batches={sub}: must divide data.generative_batch_size="
                       f"{c.data.generative_batch_size}")


def _check_optimizer(c) -> None:
  o = c.optimizer
  _num(o, "lr", "optimizer", lo=0.0, lo_open=True)
  _num(o, "warmup_ratio", "optimizer", lo=0.0, hi=1.0)
  _num(o, "weight_decay", "optimizer", lo=0.0)
  _num(o, "b1", "optimizer", lo=0.0, hi=1.0, hi_open=True)
  _num(o, "b2", "optimizer", lo=0.0, hi=1.0, hi_open=True)
  _num(o, "eps", "optimizer", lo=0.0, lo_open=True)
  _num(o, "grad_clip", "optimizer", lo=0.0)  # 0 = no clipping


def _check_train(c) -> None:
  t = c.train
  emb, gen = _passes(c)
  _int(t, "steps", 1, "train")
  accum = _int(t, "grad_accum", 1, "train")
  chunk = _int(t, "gradcache_chunk", 0, "train")
  _int(t, "seed", 0, "train")
  _int(t, "log_every", 1, "train")
  for name in ("eval_every", "save_every", "stop_after"):
    _int(t, name, 0, "train")
  _int(t, "keep_checkpoints", 1, "train")
  _bool(t, "export_hf", "train")
  _bool(t, "async_checkpoint", "train")
  _bool(t, "allow_unverified_checkpoints", "train")
  if not isinstance(t.checkpoint_dir, str):
    raise GritJaxError(f"config.train.checkpoint_dir={t.checkpoint_dir!r}: must be a path string")
  q = c.data.embedding_batch_size
  if emb and chunk and q % chunk:
    raise GritJaxError(f"config.train.gradcache_chunk={chunk}: must divide data.embedding_batch_size={q}")
  if emb and not chunk and q % accum:
    raise GritJaxError(f"config.train.grad_accum={accum}: must divide data.embedding_batch_size={q} "
                       "(its embedding part runs as GradCache chunks)")
  g = c.data.generative_batch_size
  if gen and g % accum:
    raise GritJaxError(f"config.train.grad_accum={accum}: must divide data.generative_batch_size={g}")


def _check_mesh(c, num_devices: int | None, num_slices: int) -> None:
  from grit_jax import sharding as mesh_lib  # the mesh shape rule is stated there

  if num_devices is None:
    for name in mesh_lib.AXES + mesh_lib.DCN_KEYS:
      v = c.mesh[name] if name in c.mesh else 1
      if not _is_int(v) or (v < 1 and v != -1):
        raise GritJaxError(f"config.mesh.{name}={v!r}: expected a positive integer or -1")
    return
  sizes = dict(zip(mesh_lib.AXES, mesh_lib.mesh_shape(c.mesh, num_devices, num_slices)))
  # The batch is split over data x fsdp (x expert); every pass's rows must split evenly.
  ways = sizes["data"] * sizes["fsdp"] * (sizes["expert"] if sizes["expert"] > 1 else 1)
  emb, gen = _passes(c)
  chunk = c.train.gradcache_chunk or (c.data.embedding_batch_size // c.train.grad_accum)
  checks = []
  # Packed passes (grit_jax.data.packing) split their sequences over the shards and chunk rows, not sequences.
  if emb:
    checks.append(("data.embedding_batch_size", c.data.embedding_batch_size))
    if not c.data.pack_embedding:
      checks.append(("queries per GradCache chunk (train.gradcache_chunk or embedding_batch_size / grad_accum)",
                     chunk))
  if gen and c.data.pack_generative:
    checks.append(("data.generative_batch_size", c.data.generative_batch_size))
  elif gen:
    checks.append(("data.generative_batch_size / train.grad_accum",
                   c.data.generative_batch_size // c.train.grad_accum))
  for what, rows in checks:
    if rows % ways:
      raise GritJaxError(f"config.{what}={rows}: not divisible by the {ways} batch shards of the mesh "
                         f"{sizes} ({num_devices} devices)")


def check_matryoshka_dims(dims, hidden_size: int, key: str = "config.loss.matryoshka_dims") -> None:
  """Matryoshka prefixes must fit the model's representation (hidden_size)."""
  if dims and max(dims) > hidden_size:
    raise GritJaxError(f"{key}={tuple(dims)!r}: {max(dims)} is larger than the model's hidden size {hidden_size}")


def _check_lengths(c, model) -> None:
  check_matryoshka_dims(c.loss.matryoshka_dims, model.hidden_size)
  emb, gen = _passes(c)
  names = (["query_max_len", "passage_max_len"] if emb else []) + (["generative_max_len"] if gen else [])
  for name in names:
    if c.data[name] > model.max_position_embeddings:
      raise GritJaxError(f"config.data.{name}={c.data[name]}: longer than the model's "
                         f"max_position_embeddings={model.max_position_embeddings}")


def init_source(spec) -> tuple[str, str]:
  """config.init_from -> ("", "") | ("hf", DIR) | ("ckpt", DIR). hf:FILE.gguf gives the directory converted from
  the file (convert.gguf.model_dir: converted once, cached by content)."""
  if not isinstance(spec, str):
    raise GritJaxError(f"config.init_from={spec!r}: expected '', hf:DIR, hf:FILE.gguf or ckpt:DIR")
  if not spec:
    return "", ""
  kind, sep, path = spec.partition(":")
  if not sep or kind not in ("hf", "ckpt") or not path:
    raise GritJaxError(f"config.init_from={spec!r}: expected '', hf:DIR, hf:FILE.gguf or ckpt:DIR")
  path = os.path.expanduser(path)
  if kind == "hf":
    from grit_jax.convert.gguf import is_gguf, model_dir
    if is_gguf(path):
      if not os.path.isfile(path):
        raise GritJaxError(f"config.init_from={spec!r}: no such GGUF file")
      path = model_dir(path)
  return kind, path


def model_config(config, *, log=print):
  """The run's ModelConfig. With init_from=hf:DIR the network's hyperparameters (`architecture_fields`) come from
  DIR/config.json, so a recipe's preset can never silently change the model being fine-tuned; the fields that
  differ from the recipe are named once through `log`."""
  from grit_jax.modeling import ModelConfig

  recipe = ModelConfig.from_dict(config.model.to_dict(), source="config.model")
  kind, path = init_source(config.init_from)
  if kind != "hf":
    return recipe
  source = ModelConfig.from_hf(path)
  taken = {f: getattr(source, f) for f in architecture_fields()}
  changed = [f"{f}={getattr(recipe, f)!r}->{v!r}" for f, v in taken.items() if getattr(recipe, f) != v]
  if changed and log is not None:
    log(f"init_from={config.init_from}: using the source model's {', '.join(changed)} (from its config.json, "
        "over the recipe's config.model)")
  return dataclasses.replace(recipe, **taken)


def check_model_overrides(config, keys) -> None:
  """`--config.model.KEY=...` on the command line for a network field (`architecture_fields`) while init_from=hf:
  takes the network from the source's config.json: a value that contradicts it is a one-line error naming the
  file and field (a recipe's own preset is replaced with a note, model_config)."""
  from grit_jax.modeling import ModelConfig

  arch = set(architecture_fields())
  keys = [k for k in keys if k in arch]
  kind, path = init_source(config.init_from) if keys else ("", "")
  if kind != "hf":
    return
  source = ModelConfig.from_hf(path)
  recipe = ModelConfig.from_dict(config.model.to_dict(), source="config.model")
  for key in keys:
    if getattr(recipe, key) != getattr(source, key):
      raise GritJaxError(f"--config.model.{key}={getattr(recipe, key)!r} contradicts "
                         f"{os.path.join(path, 'config.json')} ({key}={getattr(source, key)!r}): init_from="
                         f"{config.init_from} takes the network from there; drop the override or the init_from")


def tokenizer_path(spec: str) -> str:
  """config.data.tokenizer as the data pipeline reads it: a tokenizer file or model directory as given, a GGUF file
  -> the directory converted from it (convert.gguf.model_dir, converted once), so data/ never converts."""
  from grit_jax.convert.gguf import is_gguf, model_dir
  path = os.path.expanduser(spec)
  if not is_gguf(path):
    return spec
  if not os.path.isfile(path):
    raise GritJaxError(f"config.data.tokenizer={spec!r}: no such GGUF file")
  return model_dir(path)


def with_model(config, model):
  """A copy of `config` whose model section is `model` (the resolved ModelConfig) and whose data.tokenizer is the
  file the pipeline reads (tokenizer_path), so the saved config.json, checkpoints and FLOP accounting describe the
  network really trained."""
  import ml_collections

  out = ml_collections.ConfigDict(config.to_dict())
  out.model = ml_collections.ConfigDict(model.to_dict())
  out.data.tokenizer = tokenizer_path(config.data.tokenizer)
  return out


def _check_files(c, model) -> None:
  emb, gen = _passes(c)
  if not os.path.isdir(c.data.train_dir):
    raise GritJaxError(f"config.data.train_dir={c.data.train_dir!r}: not a folder")
  if c.data.eval_dir and not os.path.isdir(c.data.eval_dir):
    raise GritJaxError(f"config.data.eval_dir={c.data.eval_dir!r}: not a folder (set it to '' for no eval)")
  distill = c.loss.distill_weight
  if emb and (distill or c.data.no_in_batch_negatives):
    from grit_jax.data import jsonl
    files = jsonl.split_files(c.data.train_dir)[jsonl.EMBEDDING]
    if distill and not any(jsonl.has_teacher_scores(f) for f in files):
      raise GritJaxError(f"config.loss.distill_weight={distill}: no embedding file of data.train_dir="
                         f"{c.data.train_dir!r} has teacher scores (pos_scores / neg_scores); set it to 0 or add them")
  for name in c.data.no_in_batch_negatives:
    if not os.path.isfile(os.path.join(c.data.train_dir, name)):
      raise GritJaxError(f"config.data.no_in_batch_negatives: {name!r} is not a file of data.train_dir="
                         f"{c.data.train_dir!r}")
  from grit_jax.data.tokenizer import Tokenizer

  check_vocab(Tokenizer(tokenizer_path(c.data.tokenizer)).vocab_size, model.vocab_size,
              key=f"config.data.tokenizer={c.data.tokenizer!r}")


def check_vocab(num_pieces: int, vocab_size: int, key: str = "tokenizer") -> None:
  """A tokenizer whose ids reach past the model's embedding table would index out of range (NaN losses in
  training, NaN embeddings at inference): a named error instead."""
  if num_pieces > vocab_size:
    raise GritJaxError(f"{key}: the tokenizer has {num_pieces} pieces but the model's vocab_size is "
                       f"{vocab_size}: ids >= {vocab_size} have no embedding")


def validate(config, *, num_devices: int | None = None, num_slices: int = 1, check_files: bool = True, log=print):
  """Checks every section of a run config; returns the run's ModelConfig (see `model_config`).

  num_devices (over num_slices slices): when given, the mesh and the batch sizes are checked against it. check_files: data folders,
  tokenizer (against the vocabulary) and init_from paths exist; off for aot, which compiles without data."""
  for section in ("model", "data", "loss", "optimizer", "mesh", "train"):
    if section not in config:
      raise GritJaxError(f"config: missing section {section!r} (recipes start from configs/base.py)")
  parse_attn(config.attn)
  _check_data(config)
  _check_loss(config)
  _check_optimizer(config)
  _check_train(config)
  _check_mesh(config, num_devices, num_slices)
  kind, path = init_source(config.init_from)
  if kind and not os.path.isdir(path):
    raise GritJaxError(f"config.init_from={config.init_from!r}: no such folder")
  model = model_config(config, log=log)
  _check_lengths(config, model)
  if check_files:
    _check_files(config, model)
  return model
