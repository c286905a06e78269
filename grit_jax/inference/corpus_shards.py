"""The encoding half of a corpus index (inference/corpus_index.py): the corpus cut into chunks of `shard_rows` rows,
dealt round-robin to the processes, each encoded into `shards/F-START-STOP.npz` and recorded in its process's
`manifest-P.json` (resumable: a rerun skips the recorded shards); `index_settings.json` pins the model, the encode
settings and the corpus files a resume must match."""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Sequence

import numpy as np

from grit_jax.data.corpus import CorpusFile, PackedIds
from grit_jax.errors import GritJaxError
from grit_jax.fileio import atomic_write, read_json, sha256_file, write_json

VERSION = 2  # 2: ids stored as UTF-8 bytes + offsets (PackedIds), not fixed-width str
SETTINGS = "index_settings.json"


@dataclasses.dataclass(frozen=True)
class Chunk:
  file: int   # index into the corpus files
  start: int  # rows [start, stop) of that file
  stop: int

  @property
  def name(self) -> str:
    return f"{self.file:05d}-{self.start:010d}-{self.stop:010d}.npz"


def chunks(files: Sequence[CorpusFile], shard_rows: int) -> list[Chunk]:
  return [Chunk(f, s, min(s + shard_rows, len(cf.ids))) for f, cf in enumerate(files)
          for s in range(0, len(cf.ids), shard_rows)]


def my_chunks(all_chunks: Sequence[Chunk], process_index: int, process_count: int) -> list[Chunk]:
  """Process p's share: chunk i goes to process i % P (every chunk to exactly one process)."""
  return [c for i, c in enumerate(all_chunks) if i % process_count == process_index]


def _manifest_path(out_dir: str, process_index: int) -> str:
  return os.path.join(out_dir, f"manifest-{process_index:05d}.json")


def done_shards(out_dir: str) -> dict[str, dict]:
  """{shard name: {"sha256", "rows"}} over every process's manifest."""
  done = {}
  for path in sorted(glob.glob(os.path.join(out_dir, "manifest-*.json"))):
    m = read_json(path, "index manifest")
    if not isinstance(m, dict) or not isinstance(m.get("shards"), dict):
      raise GritJaxError(f"{path}: not an index manifest (no 'shards')")
    done.update(m["shards"])
  return done


def encode_settings(model, max_length: int | None, attn: str | None) -> dict:
  """What the embeddings depend on besides the weights; recorded, and checked at every resume and search."""
  return {"max_length": model.max_length(max_length), "causal": model.embedding_causal(attn),
          "pooling": model.pooling, "normalize": bool(model.normalize), "instruction": ""}


def _check_same(recorded: dict, current: dict, where: str) -> None:
  """A GritJaxError naming the first difference between the recorded settings and this run's."""
  if recorded.get("version") != current["version"]:  # its shards are in another format
    raise GritJaxError(f"{where}: started by a grit_jax writing index format {recorded.get('version')}, this one "
                       f"writes format {current['version']}: use another --out (or delete this one)")
  if recorded.get("model", {}).get("weights") != current["model"]["weights"]:
    raise GritJaxError(f"{where}: started with model {recorded.get('model', {}).get('name')} (weights "
                       f"{recorded.get('model', {}).get('weights')}), not this model {current['model']['name']} "
                       f"(weights {current['model']['weights']}): use another --out")
  old, new = recorded.get("corpus", []), current["corpus"]
  if [c["path"] for c in old] != [c["path"] for c in new]:
    raise GritJaxError(f"{where}: started with --corpus {[c['path'] for c in old]}, now "
                       f"{[c['path'] for c in new]}: use another --out")
  for o, c in zip(old, new):
    if o["sha256"] != c["sha256"]:
      raise GritJaxError(f"{where}: corpus file {c['path']} changed since the index was started (sha256 "
                         f"{o['sha256'][:16]} -> {c['sha256'][:16]}): use another --out")
  for key, value in current["encode"].items():
    if recorded.get("encode", {}).get(key) != value:
      raise GritJaxError(f"{where}: started with {key}={recorded.get('encode', {}).get(key)!r}, now {value!r}")
  if recorded.get("shard_rows") != current["shard_rows"]:
    raise GritJaxError(f"{where}: started with shard_rows={recorded.get('shard_rows')}, now "
                       f"{current['shard_rows']}")


def _write_shard(path: str, ids: Sequence[str], emb: np.ndarray) -> None:
  atomic_write(path, lambda f: np.savez(f, emb=emb, **PackedIds.of(ids).arrays()), "wb")


def _commit(out_dir: str, process_index: int, shards: dict) -> None:
  write_json(_manifest_path(out_dir, process_index), {"shards": shards}, indent=0)


def encode_corpus(model, files: Sequence[CorpusFile], out_dir: str, *, shard_rows: int = 4096,
                  batch_size: int = 64, max_length: int | None = None, attn: str | None = None,
                  packing: bool | None = None, process_index: int = 0, process_count: int = 1,
                  show_progress_bar: bool = True) -> dict:
  """Encode this process's share of the corpus into shards (skipping those done), and return the settings."""
  from tqdm import tqdm

  from grit_jax.inference import encode as encode_lib
  from grit_jax.inference import rag_index
  if shard_rows < 1:
    raise GritJaxError(f"shard_rows={shard_rows}: must be >= 1")
  enc = encode_settings(model, max_length, attn)
  settings = {"version": VERSION, "model": rag_index.model_identity(model), "encode": enc, "shard_rows": shard_rows,
              "corpus": [{"path": os.path.abspath(cf.path), "sha256": sha256_file(cf.path), "rows": len(cf.ids)}
                         for cf in files]}
  os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
  settings_path = os.path.join(out_dir, SETTINGS)
  if os.path.exists(settings_path):
    _check_same(read_json(settings_path, "index settings"), settings, settings_path)
  elif process_index == 0:
    write_json(settings_path, settings, indent=1)
  shard_path = lambda name: os.path.join(out_dir, "shards", name)  # noqa: E731
  # a listed shard deleted by the user (after a checksum error) is encoded again
  done = {n: v for n, v in done_shards(out_dir).items() if os.path.exists(shard_path(n))}
  todo, own = my_chunks(chunks(files, shard_rows), process_index, process_count), {}
  if os.path.exists(_manifest_path(out_dir, process_index)):
    own = {n: v for n, v in read_json(_manifest_path(out_dir, process_index), "index manifest")["shards"].items()
           if n in done}
  for c in todo:  # temporary files of a killed run of this process's share (never another process's)
    for tmp in glob.glob(os.path.join(out_dir, "shards", glob.escape(c.name) + ".tmp*")):
      os.remove(tmp)
  todo = [c for c in todo if c.name not in done]
  bar = tqdm(total=sum(c.stop - c.start for c in todo), unit="doc", desc=f"Indexing (process {process_index})",
             disable=not show_progress_bar, dynamic_ncols=True)
  with model.truncation_report(), bar:
    for c in todo:
      cf = files[c.file]
      tokens = encode_lib.tokenize(model, cf.texts(c.start, c.stop), "", enc["max_length"])
      model.count_truncation(tokens, enc["max_length"])
      emb_nD = encode_lib.encode_tokens(model, tokens, batch_size, enc["max_length"], enc["pooling"],
                                        enc["normalize"], enc["causal"], show_progress_bar=False, packing=packing)
      path = shard_path(c.name)
      _write_shard(path, cf.ids[c.start:c.stop], emb_nD)
      own[c.name] = {"sha256": sha256_file(path), "rows": c.stop - c.start}
      _commit(out_dir, process_index, own)
      bar.update(c.stop - c.start)
  return settings


def load_shard(path: str, want: dict, ids: Sequence[str]) -> np.ndarray:
  """A shard's emb [n, D], after its sha256 and ids are checked against the manifest and the corpus."""
  if not os.path.exists(path):
    raise GritJaxError(f"{path}: listed in the manifest but missing: rerun `grit-jax index` to encode it again")
  if sha256_file(path) != want["sha256"]:
    raise GritJaxError(f"{path}: does not match the sha256 in its manifest (damaged): delete it and rerun "
                       f"`grit-jax index` to encode it again")
  try:
    with np.load(path) as z:
      got_ids, emb = PackedIds.check(z["ids_utf8"], z["ids_offsets"], path), z["emb"]
  except (OSError, ValueError, KeyError) as e:
    raise GritJaxError(f"{path}: cannot read ({e})") from e
  if got_ids != PackedIds.of(ids):
    raise GritJaxError(f"{path}: holds other ids than its corpus rows")
  return emb
