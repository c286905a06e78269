"""What inference needs to serve a model the way it was trained, stored next to its weights as grit_settings.json.

Written with every servable directory (`convert.servable.write_servable`: the training export, `GritLM.save_pretrained`,
`convert jax-to-hf` / `ckpt-to-hf`; `hf-to-jax` copies it along); read by `GritLM.from_pretrained` and the inference CLI, which use it as their defaults
(an explicit argument overrides it, with one log line). A directory without the file (e.g. a model downloaded from
the Hub) gets the GritLM defaults below, which are those of the published GritLM models.

  attn               attention of the passes as config.attn: chars 1-2 embedding (b/c), 3-4 generative
  pooling            common_types.POOLINGS (cls: inference only)
  normalize          L2-normalised embeddings
  template           the instruction / chat format version (data.templates); another version is an error
  query_max_len      max tokens of a query / passage / generative sequence in training; the longer of the first two
  passage_max_len    is the model's embedding max length (`embedding_max_len`), queries and passages alike
  generative_max_len
  query_instruction  (optional, written only when set) the instruction `GritLM.encode_queries` and the export's
                     sentence-transformers `query` prompt use by default; absent = none, as gritlm's encode_queries
  train_data         {"fingerprint": sha256 over the train files' content fingerprints, "files": [[name, size, sha256]]}
  matryoshka_dims    (optional, written only when trained with config.loss.matryoshka_dims) the embedding sizes the
                     model was trained to serve truncated: `GritLM.encode(..., dim=k)`, `grit-jax embed --dim`
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

from grit_jax import common_types
from grit_jax.errors import GritJaxError
from grit_jax.fileio import read_json, write_json

SETTINGS_FILE = "grit_settings.json"
VERSION = 1
TEMPLATE_VERSION = "gritlm-1"  # <s><|user|>\n{instruction}\n<|embed|>\n{text}; <s><|user|>\n{msg}\n<|assistant|>\n
GRITLM_MAX_LENGTH = 512  # gritlm.GritLM.encode's max_length (and MTEB's): GritLM(path, ...), models without the file


@dataclasses.dataclass(frozen=True)
class Settings:
  attn: str = "bbcc"
  pooling: str = "mean"
  normalize: bool = True
  template: str = TEMPLATE_VERSION
  query_max_len: int = 512
  passage_max_len: int = 512
  generative_max_len: int | None = None
  train_data: dict | None = None
  query_instruction: str | None = None
  matryoshka_dims: tuple[int, ...] | None = None
  source: str = "defaults"  # where they came from (the file's path, or "defaults"); not stored

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("source")
    for key in ("query_instruction", "matryoshka_dims"):  # absent unless set: older readers know every other key
      if d[key] is None:
        d.pop(key)
    if "matryoshka_dims" in d:
      d["matryoshka_dims"] = list(d["matryoshka_dims"])
    return {"version": VERSION, **d}


def check(s: Settings, where: str) -> Settings:
  """Every value in range, or a GritJaxError naming `where` and the key."""
  def bad(key, why):
    raise GritJaxError(f"{where}: {key}={getattr(s, key)!r}: {why}")
  common_types.parse_attn(s.attn, key=f"{where}: attn")
  if s.pooling not in common_types.POOLINGS:
    bad("pooling", f"expected one of {common_types.POOLINGS}")
  if not isinstance(s.normalize, bool):
    bad("normalize", "expected true or false")
  if s.template != TEMPLATE_VERSION:
    bad("template", f"this grit_jax serves template {TEMPLATE_VERSION!r} only")
  for key in ("query_max_len", "passage_max_len", "generative_max_len"):
    v = getattr(s, key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
      bad(key, "expected a positive integer")
  if s.query_instruction is not None and not isinstance(s.query_instruction, str):
    bad("query_instruction", "expected a string")
  dims = s.matryoshka_dims
  if dims is not None and (not dims or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in dims)
                           or any(b <= a for a, b in zip(dims, dims[1:]))):
    bad("matryoshka_dims", "expected strictly increasing positive integers")
  return s


def embedding_max_len(s: Settings) -> int:
  """The max tokens (template included) of the model's embedding passes, queries and passages alike: the longer of
  the lengths it was trained with (GRITLM_MAX_LENGTH for a model without grit_settings.json). The one default of
  every entry point (GritLM.encode*, `grit-jax embed | eval | mteb | rag`, the sentence-transformers export's
  max_seq_length) unless given another; GritLM(path, ...) keeps gritlm's GRITLM_MAX_LENGTH instead."""
  return max(s.query_max_len, s.passage_max_len)


def read(model_dir: str) -> Settings:
  """The directory's settings, or the defaults when it has no grit_settings.json."""
  path = os.path.join(model_dir, SETTINGS_FILE)
  if not os.path.isfile(path):
    return Settings()
  raw = read_json(path, "the model's settings")
  if not isinstance(raw, dict) or raw.get("version") != VERSION:
    raise GritJaxError(f"{path}: expected a JSON object with version={VERSION}")
  fields = {f.name for f in dataclasses.fields(Settings)} - {"source"}
  unknown = sorted(set(raw) - fields - {"version"})
  if unknown:
    raise GritJaxError(f"{path}: unknown key(s) {unknown}")
  values = {k: v for k, v in raw.items() if k != "version"}
  if isinstance(values.get("matryoshka_dims"), list):
    values["matryoshka_dims"] = tuple(values["matryoshka_dims"])
  return check(Settings(**values, source=path), path)


def write(model_dir: str, settings: Settings) -> str:
  path = os.path.join(model_dir, SETTINGS_FILE)
  write_json(path, settings.to_json(), sort_keys=True)
  return path


def copy(src_dir: str, dst_dir: str) -> bool:
  """Carry the settings file along a conversion (checked first, so a damaged one is not propagated)."""
  if not os.path.isfile(os.path.join(src_dir, SETTINGS_FILE)):
    return False
  read(src_dir)
  shutil.copyfile(os.path.join(src_dir, SETTINGS_FILE), os.path.join(dst_dir, SETTINGS_FILE))
  return True


def train_data_fingerprint(train_dir: str) -> dict | None:
  """Content fingerprint of the training files (the data pipeline's own per-file fingerprint)."""
  if not train_dir or not os.path.isdir(train_dir):
    return None
  from grit_jax.data.tfds_builders import _file_fingerprint  # training side only: imports tfds
  files = [_file_fingerprint(os.path.join(train_dir, n)) for n in sorted(os.listdir(train_dir))
           if n.endswith(".jsonl")]
  digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
  return {"fingerprint": digest, "files": files}


def from_config(config) -> Settings:
  """The settings a training recipe's model is served with."""
  d = config.data
  return check(Settings(attn=config.attn, pooling=config.loss.pooling, normalize=bool(config.loss.normalize),
                        query_max_len=int(d.query_max_len), passage_max_len=int(d.passage_max_len),
                        generative_max_len=int(d.generative_max_len),
                        train_data=train_data_fingerprint(d.train_dir),
                        matryoshka_dims=tuple(config.loss.matryoshka_dims) or None, source="config"), "config")
