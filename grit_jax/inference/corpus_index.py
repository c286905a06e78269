"""A corpus index at scale: resumable, multi-host sharded encoding into a FAISS index, and search over it.

  build(model, corpus_files, out_dir, ...)   encode (resumable) + FAISS index; `grit-jax index`
  CorpusIndex.load(dir).search(q_QD, k)      (rows [Q, k], scores [Q, k]); `grit-jax search`, GritLM.search
  device_topk(emb_ND, q_QD, k)               exact top-k on device over a row-sharded embedding matrix

Corpus rows: JSONL objects {"id": str|int, "text": str, "title": str (optional)} ("_id" as in BEIR corpora). Every
file is read and checked (a row without id or text, a duplicate id) before the model runs.

Layout of `out_dir` (index_settings.json, shards/ and the manifests: inference/corpus_shards.py):
  index_settings.json     written once at the first start: the model's weights fingerprint, the encode settings
                          (max length, attention, pooling, normalisation) and each corpus file's sha256. A resume
                          with another model, other settings or a changed corpus file is an error naming which.
  shards/F-START-STOP.npz ids (PackedIds) + emb [n, D] float32 of rows [START, STOP) of corpus file F, each written
                          atomically; the chunks are dealt round-robin to the processes (chunk i -> process i % P).
  manifest-P.json         process P's finished shards with their sha256, rewritten atomically after each one. A
                          shard is done only once its manifest entry exists: a kill between the shard's rename and
                          the manifest redoes that shard under the same name (never two copies), and the index is
                          built from the manifests' shards only, after checking each one's sha256.
  embeddings.npy          [N, D] float32 in corpus order (read by memory map: rescoring and device search)
  ids_utf8.npy, ids_offsets.npy  the N ids as data.corpus.PackedIds (UTF-8 bytes end to end, N + 1 offsets)
  locations.npy           [N, 2] int64 (corpus file, byte offset of the row): document texts on demand
  faiss.index             flat inner product (exact), IVF-PQ or HNSW, or int8 (scalar quantizer) / binary (Hamming)
  corpus_index.json       written last: everything above plus the FAISS settings and each file's sha256

Approximate kinds (ivfpq, hnsw, int8, binary) rescore their top `rescore` x k candidates with the float vectors
(read from embeddings.npy on disk for those rows only), as sentence-transformers' quantized search does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Sequence

import numpy as np

from grit_jax.data.corpus import CorpusFile, PackedIds, document_text, read_corpus, row_at
from grit_jax.errors import GritJaxError
from grit_jax.fileio import atomic_write, read_json, sha256_file, write_json
from grit_jax.inference.corpus_shards import VERSION, chunks, done_shards, encode_corpus, load_shard
from grit_jax.inference.vector_search import FaissSettings, build_faiss, device_corpus, device_topk, faiss_search

log = logging.getLogger(__name__)

META = "corpus_index.json"
FINAL_FILES = ("embeddings.npy", "ids_utf8.npy", "ids_offsets.npy", "locations.npy", "faiss.index")


# ---------------------------------------------------------------------------------------------------------------
# the index


def build(model, corpus_paths: Sequence[str], out_dir: str, faiss_settings: FaissSettings = FaissSettings(), *,
          process_index: int = 0, process_count: int = 1, barrier=None, **encode_kwargs) -> "CorpusIndex | None":
  """`grit-jax index`: encode this process's share (resuming), then on process 0, once every share is done (after
  `barrier()` on several processes), the FAISS index. Returns the index on process 0, None on the others."""
  files = read_corpus(corpus_paths)
  settings = encode_corpus(model, files, out_dir, process_index=process_index, process_count=process_count,
                           **encode_kwargs)
  if barrier is not None:
    barrier()
  if process_index != 0:
    return None
  return finish(out_dir, files, settings, faiss_settings)


def finish(out_dir: str, files: Sequence[CorpusFile], settings: dict, fs: FaissSettings) -> "CorpusIndex":
  """Gather every shard (each checked against its manifest sha256) in corpus order and write the FAISS index;
  a missing shard is an error naming how many and the first."""
  import faiss
  meta_path = os.path.join(out_dir, META)
  if os.path.exists(meta_path):
    meta = read_json(meta_path, "index metadata")
    if meta.get("faiss") == dataclasses.asdict(fs) and meta.get("model") == settings["model"] and \
        meta.get("corpus") == settings["corpus"]:
      log.info("%s: already built", out_dir)
      return CorpusIndex.load(out_dir)
  all_chunks, done = chunks(files, settings["shard_rows"]), done_shards(out_dir)
  missing = [c.name for c in all_chunks if c.name not in done]
  if missing:
    raise GritJaxError(f"{out_dir}: {len(missing)} of {len(all_chunks)} shards not encoded yet (first: "
                       f"shards/{missing[0]}); rerun `grit-jax index` (every process) to finish them")
  N = sum(len(cf.ids) for cf in files)
  t0 = time.perf_counter()
  emb_path = os.path.join(out_dir, "embeddings.npy")
  tmp = emb_path + f".tmp{os.getpid()}"
  try:
    emb_ND, row = None, 0
    for c in all_chunks:
      part = load_shard(os.path.join(out_dir, "shards", c.name), done[c.name], files[c.file].ids[c.start:c.stop])
      if emb_ND is None:
        emb_ND = np.lib.format.open_memmap(tmp, "w+", np.float32, (N, part.shape[1]))
      emb_ND[row:row + len(part)] = part
      row += len(part)
    emb_ND.flush()
    del emb_ND
    os.replace(tmp, emb_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  emb_ND = np.load(emb_path, mmap_mode="r")
  ids = PackedIds.of(np.concatenate([cf.ids for cf in files]))
  locations = np.concatenate([np.stack([np.full(len(cf.offsets), f), cf.offsets], 1) for f, cf in enumerate(files)])
  for name, array in ids.arrays().items():
    atomic_write(os.path.join(out_dir, name + ".npy"), lambda f: np.save(f, array), "wb")
  atomic_write(os.path.join(out_dir, "locations.npy"), lambda f: np.save(f, locations), "wb")
  index = build_faiss(np.asarray(emb_ND), fs)
  faiss_path = os.path.join(out_dir, "faiss.index")
  serialize = faiss.serialize_index_binary if fs.quantize == "binary" else faiss.serialize_index
  atomic_write(faiss_path, lambda f: f.write(serialize(index).tobytes()), "wb")
  meta = dict(settings, num_documents=N, dim=int(emb_ND.shape[1]), faiss=dataclasses.asdict(fs),
              sha256={n: sha256_file(os.path.join(out_dir, n)) for n in FINAL_FILES})
  write_json(meta_path, meta, indent=1)
  log.info("%s: %s index of %d documents built in %.1f s", out_dir, fs.kind, N, time.perf_counter() - t0)
  return CorpusIndex.load(out_dir, verify=False)


class CorpusIndex:
  """A built index folder: search by embeddings, ids, and document texts read from the corpus files on demand."""

  def __init__(self, path: str, meta: dict, index, emb_ND, ids, locations):
    self.path, self.meta, self.index = path, meta, index
    self.embeddings, self.ids, self.locations = emb_ND, ids, locations
    self.fs = FaissSettings(**meta["faiss"])
    self.causal = bool(meta["encode"]["causal"])
    self.model = meta["model"]
    self._device = None
    self._corpus_checked = False

  def __len__(self) -> int:
    return len(self.ids)

  @staticmethod
  def exists(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))

  @classmethod
  def load(cls, path: str, verify: bool = True) -> "CorpusIndex":
    """Every missing or damaged file is a GritJaxError naming it (verify: sha256 of every file, which reads them
    whole; otherwise their sizes are checked by loading)."""
    import faiss
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
      raise GritJaxError(f"{path}: not a corpus index (no {META}; build one with `grit-jax index`)")
    meta = read_json(meta_path, "index metadata")
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
      raise GritJaxError(f"{meta_path}: not a version {VERSION} corpus index: rebuild it")
    for name in FINAL_FILES:
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        raise GritJaxError(f"{file}: missing: rerun `grit-jax index`")
      if verify and sha256_file(file) != meta["sha256"].get(name):
        raise GritJaxError(f"{file}: does not match the sha256 in {meta_path} (edited or damaged): rerun "
                           "`grit-jax index` after deleting it")
    try:
      # memory-mapped: a search reads the rows of its hits, not the corpus's N vectors, ids and locations
      emb, utf8, offsets, locations = (np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r")
                                       for name in ("embeddings", "ids_utf8", "ids_offsets", "locations"))
      ids = PackedIds.check(utf8, offsets, os.path.join(path, "ids_offsets.npy"))
      read = faiss.read_index_binary if meta["faiss"]["quantize"] == "binary" else faiss.read_index
      index = read(os.path.join(path, "faiss.index"))
    except (OSError, ValueError, RuntimeError) as e:
      raise GritJaxError(f"{path}: cannot read the index ({e})") from e
    if not emb.shape[0] == len(ids) == len(locations) == index.ntotal == meta["num_documents"]:
      raise GritJaxError(f"{path}: embeddings ({emb.shape[0]}), ids ({len(ids)}), FAISS ({index.ntotal}) and "
                         f"{META} ({meta['num_documents']}) disagree in count")
    return cls(path, meta, index, emb, ids, locations)

  def check_model(self, model, where: str = "index") -> None:
    """A GritJaxError unless the index was built by `model` (same weights fingerprint)."""
    if self.model.get("weights") != model.weights_fingerprint():
      raise GritJaxError(f"{where} {self.path}: built with model {self.model.get('name')} (weights "
                         f"{self.model.get('weights')}), not with this model "
                         f"{getattr(model, 'name_or_path', None)} (weights {model.weights_fingerprint()})")

  def search(self, q_QD: np.ndarray, k: int = 10, on_device: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(rows [Q, k], scores [Q, k]) best first, by FAISS (rescored by the float vectors where approximate) or,
    `on_device`, by the exact top-k over the embeddings held on the local devices (placed at the first call)."""
    q_QD = np.atleast_2d(np.asarray(q_QD, np.float32))
    if q_QD.shape[1] != self.embeddings.shape[1]:
      raise GritJaxError(f"query embeddings of size {q_QD.shape[1]}, the index holds {self.embeddings.shape[1]}")
    if k < 1:
      raise GritJaxError(f"k={k}: must be >= 1")
    if on_device:
      if self._device is None:
        self._device = device_corpus(np.asarray(self.embeddings))
      return device_topk(self._device, q_QD, k)
    return faiss_search(self.index, self.fs, self.embeddings, q_QD, k)

  def check_corpus(self) -> None:
    """A GritJaxError when a corpus file changed since the index was built (texts are read from them)."""
    for c in self.meta["corpus"]:
      try:
        got = sha256_file(c["path"])
      except OSError as e:
        raise GritJaxError(f"corpus file {c['path']} of index {self.path}: cannot read ({e.strerror})") from e
      if got != c["sha256"]:
        raise GritJaxError(f"corpus file {c['path']} changed since index {self.path} was built (sha256 "
                           f"{c['sha256'][:16]} -> {got[:16]}): rebuild the index")
    self._corpus_checked = True

  def row(self, row: int) -> dict:
    """The corpus row (the JSON object) of index row `row`, read from its corpus file (checked once per index)."""
    if not self._corpus_checked:
      self.check_corpus()
    f, offset = self.locations[row]
    with open(self.meta["corpus"][int(f)]["path"], "rb") as fh:
      return row_at(fh, int(offset))

  def document(self, row: int) -> str:
    """The text of index row `row` as it was embedded (data.corpus.document_text: title joined)."""
    return document_text(self.row(row), f"index {self.path}: row {row}")

  @property
  def documents(self):
    """Sequence view of the texts by row (what rag reads)."""
    return _Documents(self)

  @property
  def has_cache(self) -> bool:
    return False

  def doc_caches(self, model, rows: Sequence[int], docs: Sequence[str], max_length: int, cache_dir: str | None):
    """KV caches [(k, v) [L, n, KVH, Dh]] of the documents at `rows` (RAG's doc modes): read from `cache_dir`
    where an earlier call stored them, else computed by an embedding pass and stored there (atomically, one file
    per document, under a folder named by the weights fingerprint, attention and max length, so another model's
    caches are never read). Without cache_dir: None (rag computes them)."""
    if cache_dir is None:
      return None
    from grit_jax.inference import rag, rag_index
    folder = os.path.join(cache_dir, f"{model.weights_fingerprint()}-{'causal' if self.causal else 'bidir'}-"
                                     f"{max_length}")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, hashlib.sha256(self.ids[r].encode()).hexdigest()[:32] + ".npz")
             for r in rows]
    out = [None] * len(rows)
    for j, path in enumerate(paths):
      if os.path.exists(path):
        try:
          with np.load(path) as z:
            out[j] = (z["k"], z["v"]) if str(z["dtype"]) != "bfloat16" else (
                z["k"].view(_bf16()), z["v"].view(_bf16()))
        except (OSError, ValueError, KeyError) as e:
          raise GritJaxError(f"{path}: damaged document KV cache ({e}): delete it") from e
    todo = [j for j, c in enumerate(out) if c is None]
    if todo:
      ids = [t.tolist() for t, _ in rag_index.embed_tokens(model, [docs[j] for j in todo], max_length)]
      for j, (k, v) in zip(todo, rag._segment_cache(model, ids, self.causal)):
        k, v = np.asarray(k), np.asarray(v)
        dtype = str(k.dtype)
        view = (lambda a: a.view(np.uint16)) if dtype == "bfloat16" else (lambda a: a)  # npz has no bfloat16
        atomic_write(paths[j], lambda f: np.savez(f, k=view(k), v=view(v), dtype=np.asarray(dtype)), "wb")
        out[j] = (k, v)
    return out


def _bf16():
  import jax.numpy as jnp
  return jnp.bfloat16


class _Documents:
  def __init__(self, index: CorpusIndex):
    self._index = index

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, row: int) -> str:
    return self._index.document(row)


def as_index(index_dir_or_obj, verify: bool = True) -> CorpusIndex:
  return index_dir_or_obj if isinstance(index_dir_or_obj, CorpusIndex) else CorpusIndex.load(index_dir_or_obj, verify)


def embed_queries(model, index: CorpusIndex, queries: Sequence[str], instruction: str | None = None,
                  max_length: int | None = None) -> np.ndarray:
  """q [Q, D] with the index's attention, pooling and normalisation; instruction None = the model's
  query_instruction (as encode_queries)."""
  from grit_jax.inference import encode as encode_lib
  index.check_model(model)
  enc = index.meta["encode"]
  instruction = model.settings.query_instruction or "" if instruction is None else instruction
  max_length = model.max_length(max_length)
  with model.truncation_report():
    tokens = encode_lib.tokenize(model, list(queries), instruction, max_length)
    model.count_truncation(tokens, max_length)
    return encode_lib.encode_tokens(model, tokens, max_length=max_length, pooling=enc["pooling"],
                                    normalize=enc["normalize"], causal=enc["causal"])


def search(model, queries, index_dir_or_obj, k: int = 10, *, instruction: str | None = None,
           max_length: int | None = None, on_device: bool = False, return_text: bool = False):
  """GritLM.search: for each query a list of {"id", "score"} (and "text" with return_text), best first; a single
  string gives one list."""
  index = as_index(index_dir_or_obj)
  single = isinstance(queries, str)
  queries = [queries] if single else list(queries)
  if not queries:
    return []
  rows, scores = index.search(embed_queries(model, index, queries, instruction, max_length), k, on_device)
  out = [[dict(id=index.ids[r], score=float(s), **({"text": index.document(r)} if return_text else {}))
          for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]
  return out[0] if single else out
