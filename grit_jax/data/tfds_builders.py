"""tensorflow-datasets builders over a local folder of GritLM JSONL files (built offline, array_record format).

One build per (folder, kind): every valid line of every file of that kind becomes one example, in file order
(shuffling disabled), with its dataset index (the file) and line number. Bad lines are handled by the bad-input
policy at build time; the per-file skip counts and messages are stored in the dataset's metadata, so a later run
that reuses the build still reports them. The array_record format gives random access (`as_data_source`), which the
numpy sampler in grit_jax.data.iterator uses for deterministic, resumable, shardable sampling.

The build is cached under `<cache>/grit_jsonl/<kind>_<fingerprint>/`; the fingerprint covers the files (name,
size, sha256 of all their bytes), the tokenizer (with the tokenizer_config.json / chat_template.jinja next to it that
set its special tokens and chat format), the max lengths, the group size and the policy, so any change
triggers a rebuild. A file's digest is remembered with its stat (`<cache>/file_sha256.json`) and recomputed when
the file changes.
`<cache>` is config.data.cache_dir, else `$GRIT_JAX_CACHE/tfds`, else `~/.cache/grit_jax/tfds`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from grit_jax import common_types
from grit_jax.data import jsonl, templates
from grit_jax.errors import GritJaxError
from grit_jax.fileio import cache_dir as _cache_dir, file_lock, sha256_file, write_json

FORMAT_VERSION = 3  # in the cache key: 2 = duplicate rows counted in the metadata; 3 = teacher scores
tfds.disable_progress_bar()


def default_cache_dir() -> str:
  return _cache_dir("tfds")


@dataclasses.dataclass
class GritJsonlConfig(tfds.core.BuilderConfig):
  """What one build reads and how it validates (every field enters the fingerprint)."""
  kind: str = jsonl.EMBEDDING
  files: tuple[str, ...] = ()
  tokenizer: str = ""
  query_max_len: int = 256
  passage_max_len: int = 2048
  generative_max_len: int = 2048
  group_size: int = 2
  bad_input: str = "skip"
  content_fingerprint: str = ""  # the same without file paths: identifies the data for resumable state


HASH_MEMO = "file_sha256.json"  # in the cache folder: {path: [[size, mtime_ns, ctime_ns, inode], sha256]}


def _file_fingerprint(path: str, memo: dict | None = None) -> list:
  """[name, size, sha256 of the whole file]: content-based, so a copied or touched file keeps its resumable state.
  `memo` keeps each file's digest with its (size, mtime, ctime, inode): a file is read again only after it changed
  (any write moves ctime), so a multi-GB corpus is hashed once, not at every start."""
  memo = {} if memo is None else memo
  st = os.stat(path)
  key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
  if memo.get(path, [None])[0] != key:
    memo[path] = [key, sha256_file(path)]
  return [os.path.basename(path), st.st_size, memo[path][1]]


def _tokenizer_fingerprint(path: str) -> str | list[str]:
  """sha256 of the tokenizer file, with those of the files next to it that set its special tokens and chat format
  (data.tokenizer.read_text_format) when there are any: they change the ids as much as the vocabulary does."""
  from grit_jax.data import tokenizer
  folder = os.path.dirname(os.path.abspath(path))
  extra = [os.path.join(folder, n) for n in (tokenizer.CONFIG_FILE, tokenizer.TEMPLATE_FILE)]
  extra = [sha256_file(p) for p in extra if os.path.isfile(p)]
  return [sha256_file(path)] + extra if extra else sha256_file(path)


def _read_memo(cache_dir: str | None) -> dict:
  try:
    with open(os.path.join(cache_dir, HASH_MEMO)) as f:
      memo = json.load(f)
    return memo if isinstance(memo, dict) else {}
  except (OSError, TypeError, ValueError):  # none yet, or unreadable: hash again
    return {}


def make_config(kind: str, files: list[str], *, tokenizer: str, query_max_len: int, passage_max_len: int,
                generative_max_len: int, group_size: int, bad_input: str,
                cache_dir: str | None = None) -> GritJsonlConfig:
  """The build's config; its name keys the cache. cache_dir: where the files' digests are remembered (None: the
  files are hashed every time)."""
  files = tuple(os.path.abspath(f) for f in files)
  memo = _read_memo(cache_dir)
  before = dict(memo)
  content = dict(v=FORMAT_VERSION, kind=kind, files=[_file_fingerprint(f, memo) for f in files],
                 tokenizer=_tokenizer_fingerprint(tokenizer), q=query_max_len, p=passage_max_len,
                 g=generative_max_len, group=group_size, bad=bad_input)
  content_fp = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
  # The build also keys on the paths, so its bad-input messages name the files this run reads.
  fingerprint = hashlib.sha256(json.dumps([content_fp, files]).encode()).hexdigest()[:16]
  if cache_dir is not None and memo != before:
    os.makedirs(cache_dir, exist_ok=True)
    write_json(os.path.join(cache_dir, HASH_MEMO), memo, indent=None)
  return GritJsonlConfig(name=f"{kind}_{fingerprint}", version=tfds.core.Version("1.0.0"), kind=kind, files=files,
                         tokenizer=os.path.abspath(tokenizer), query_max_len=query_max_len,
                         passage_max_len=passage_max_len, generative_max_len=generative_max_len,
                         group_size=group_size, bad_input=bad_input, content_fingerprint=content_fp)


class GritJsonl(tfds.core.GeneratorBasedBuilder):
  """GritLM JSONL (embedding or generative) -> tfds examples; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = []  # configs are made per folder by make_config

  def _info(self) -> tfds.core.DatasetInfo:
    text, texts = tfds.features.Text(), tfds.features.Sequence(tfds.features.Text())
    if self.builder_config.kind == jsonl.EMBEDDING:
      scores = tfds.features.Sequence(np.float32)  # a teacher's, per pos / neg text; empty = none (jsonl.py)
      features = {"query_instruction": text, "query": text, "pos_instructions": texts, "pos": texts,
                  "neg_instructions": texts, "neg": texts, "pos_scores": scores, "neg_scores": scores}
    else:
      features = {"turns": texts, "chat": np.bool_}
    features.update(dataset=np.int32, line=np.int32)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 metadata=tfds.core.MetadataDict(),
                                 # Keep file order: dataset d occupies the index range [offset_d, offset_d+count_d).
                                 disable_shuffling=True,
                                 description=f"GritLM {self.builder_config.kind} JSONL from local files")

  # tfds prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and prepared" to stdout
  # for every build; nothing is downloaded here, and the build is a local cache of the user's files.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    from grit_jax.data.tokenizer import Tokenizer  # seqio import stays out of module import

    tok = Tokenizer(cfg.tokenizer)

    @functools.lru_cache(maxsize=65536)
    def prefix_len(instruction: str) -> int:
      return len(tok.encode(templates.embed_prefix(instruction, tok.text_format)))

    def check_embedding(rec: dict) -> None:
      for key, items, max_len in (("query", [rec["query"]], cfg.query_max_len),
                                  ("pos", rec["pos"], cfg.passage_max_len), ("neg", rec["neg"], cfg.passage_max_len)):
        for i, (instr, _) in enumerate(items):
          n = prefix_len(instr)
          if n >= max_len:
            where = key if key == "query" else f"{key}[{i}]"
            raise jsonl.BadLine(f"{where}: instruction too long ({n} prefix tokens leave no room for text under "
                                f"max_len={max_len})")

    def check_generative(rec: dict) -> None:
      if rec["chat"]:
        n = len(tok.encode(templates.render_chat(rec["turns"][:1], True, tok.text_format)))
        if n >= cfg.generative_max_len:
          raise jsonl.BadLine(f"text[0]: first user turn too long ({n} tokens leave no room for the answer under "
                              f"generative_max_len={cfg.generative_max_len})")

    stats = jsonl.BadInputStats()
    counts, scored = [], []
    check = check_embedding if cfg.kind == jsonl.EMBEDDING else check_generative
    for d, path in enumerate(cfg.files):
      n, seen, first_scored = 0, {}, None  # row digest -> its first line; (line, has scores) of the first row
      for lineno, rec in jsonl.read_file(path, cfg.kind, policy=cfg.bad_input, stats=stats,
                                         group_size=cfg.group_size, check=check):
        n += 1
        has_scores = "pos_scores" in rec
        first_scored = first_scored or (lineno, has_scores)
        if has_scores != first_scored[1]:  # whatever the policy: skipping would drop a part of the file silently
          raise GritJaxError(f"{path}:{lineno}: {'has' if has_scores else 'has no'} pos_scores / neg_scores but line "
                             f"{first_scored[0]} {'has none' if has_scores else 'has'}: teacher scores go on every row "
                             "of a file or on none")
        digest = hashlib.blake2b(json.dumps(rec, sort_keys=True).encode(), digest_size=16).digest()
        if digest in seen:
          stats.add_duplicate(path, f"{path}:{lineno}: the same row as line {seen[digest]}")
        else:
          seen[digest] = lineno
        if cfg.kind == jsonl.EMBEDDING:
          ex = {"query_instruction": rec["query"][0], "query": rec["query"][1],
                "pos_instructions": [p[0] for p in rec["pos"]], "pos": [p[1] for p in rec["pos"]],
                "neg_instructions": [p[0] for p in rec["neg"]], "neg": [p[1] for p in rec["neg"]],
                "pos_scores": rec.get("pos_scores", []), "neg_scores": rec.get("neg_scores", [])}
        else:
          ex = {"turns": rec["turns"], "chat": rec["chat"]}
        yield f"{d:06d}:{lineno:012d}", dict(ex, dataset=d, line=lineno)
      counts.append(n)
      scored.append(bool(first_scored and first_scored[1]))
    if sum(counts) == 0:
      raise GritJaxError(f"no valid {cfg.kind} lines in {list(cfg.files)}\n{stats.report()}")
    self.info.metadata.update(files=list(cfg.files), counts=counts, scored=scored, bad_input=stats.to_json())


class JsonlDataset:
  """A built GritJsonl with random access: `len`, `records(indices)`, per-dataset offsets and skip stats."""

  def __init__(self, builder: GritJsonl):
    self.builder = builder
    self.kind = builder.builder_config.kind
    meta = builder.info.metadata
    self.files: list[str] = list(meta["files"])
    self.counts = np.asarray(meta["counts"], np.int64)  # [num datasets]
    self.scored = list(meta.get("scored", [False] * len(self.files)))  # per file: rows carry teacher scores
    self.offsets = np.concatenate([[0], np.cumsum(self.counts)])  # [num datasets + 1]
    self.stats = jsonl.BadInputStats.from_json(meta.get("bad_input"))
    self.source = builder.as_data_source("train")
    if len(self.source) != int(self.offsets[-1]):
      raise GritJaxError(f"tfds build {builder.data_dir} is inconsistent ({len(self.source)} examples, metadata "
                         f"says {int(self.offsets[-1])}); delete it to rebuild")

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def dataset_of(self, index: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.offsets, index, side="right") - 1

  def records(self, indices) -> list[dict]:
    """Decoded records (python strings) of the given global indices."""
    idx = [int(i) for i in indices]
    try:
      raw = self.source.__getitems__(idx) if hasattr(self.source, "__getitems__") else [self.source[i] for i in idx]
      return [_decode(r) for r in raw]
    except Exception as e:  # noqa: BLE001 - a record damaged after the build fails when it is read
      raise damaged_build(os.path.dirname(os.fspath(self.builder.data_dir)), e) from None


def _decode(value):
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
    return [_decode(v) for v in value]
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return value.item()
  if isinstance(value, np.generic):
    return value.item()
  return value


def build(folder_files: list[str], kind: str, *, tokenizer: str, query_max_len: int, passage_max_len: int,
          generative_max_len: int, group_size: int, bad_input: str, cache_dir: str | None = None) -> JsonlDataset:
  """Builds (or reuses) the tfds dataset of `folder_files` of one kind and opens it for random access.

  With bad_input="error" the first bad line raises GritJaxError naming file and line (and nothing is cached).
  """
  cache_dir = cache_dir or default_cache_dir()
  config = make_config(kind, folder_files, tokenizer=tokenizer, query_max_len=query_max_len,
                       passage_max_len=passage_max_len, generative_max_len=generative_max_len,
                       group_size=group_size, bad_input=bad_input, cache_dir=cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  # Several local processes (multi-process runs, parallel tests) may ask for the same build: one builds, the
  # others wait and then open the finished build (a builder made after the lock reads its stored metadata).
  folder = os.path.join(cache_dir, GritJsonl.name, config.name)
  record, lock = file_lock(os.path.join(cache_dir, f".{config.name}.lock"))
  with record, lock:  # waits for another process's build
    cached = os.path.isdir(folder)
    try:
      builder = GritJsonl(config=config, data_dir=cache_dir, file_format="array_record")
      builder.download_and_prepare()
      return JsonlDataset(builder)
    except GritJaxError:
      raise
    except Exception as e:  # noqa: BLE001 - tfds / array_record fail in their own ways on a damaged cached file
      if not cached:
        raise
      raise damaged_build(folder, e) from None


def damaged_build(folder: str, e: Exception) -> GritJaxError:
  why = (str(e).strip().splitlines() or [""])[0][:200]
  return GritJaxError(f"tfds build {folder} is damaged ({type(e).__name__}: {why}); delete that folder and it is "
                      "rebuilt from the JSONL files")


def mode_kinds(data_cfg) -> tuple[str, ...]:
  """The kinds of data config.data.mode trains on."""
  emb, gen = common_types.passes(data_cfg.mode)
  return ((jsonl.EMBEDDING,) if emb else ()) + ((jsonl.GENERATIVE,) if gen else ())


_REPORTED: set[str] = set()  # builds whose skipped lines this process has reported (evaluation reopens them)


def load_datasets(data_cfg, folder: str, tokenizer_path: str, cache_dir: str | None,
                  kinds: tuple[str, ...]) -> dict[str, JsonlDataset]:
  """{kind: built dataset} for the requested kinds of `folder` (missing kind = GritJaxError). Lines skipped by the
  bad-input policy are reported (per file, once per process), also when the build comes from the cache."""
  files = jsonl.split_files(folder)
  out = {}
  for kind in kinds:
    if not files[kind]:
      key = '"query"' if kind == jsonl.EMBEDDING else '"text"'
      raise GritJaxError(f"config.data.mode={data_cfg.mode!r} needs {kind} data, but no "
                         f"file in {folder!r} has {key} lines")
    out[kind] = ds = build(
        files[kind], kind, tokenizer=tokenizer_path, query_max_len=int(data_cfg.query_max_len),
        passage_max_len=int(data_cfg.passage_max_len), generative_max_len=int(data_cfg.generative_max_len),
        group_size=int(data_cfg.train_group_size), bad_input=data_cfg.bad_input,
        cache_dir=cache_dir)
    if (ds.stats.total or ds.stats.total_duplicates) and ds.builder.builder_config.name not in _REPORTED:
      _REPORTED.add(ds.builder.builder_config.name)
      logging.warning("%s", ds.stats.report())
  return out
