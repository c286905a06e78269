"""The document side of RAG (inference/rag.py): a corpus embedded once, with each document's KV states from that
same pass when Doc Caching will reuse them (`build_index`), saved as a folder (`RagIndex.save` / `load`: embeddings,
documents, KV caches, and index.json recording the model fingerprint, the corpus hash and each file's sha256)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from grit_jax.data.corpus import document_text
from grit_jax.errors import GritJaxError
from grit_jax.fileio import atomic_write, read_json, sha256_file, write_json
from grit_jax.inference import encode as encode_lib


INDEX_VERSION = 3  # 2: records the model and corpus it was built from; 3: the sha256 of each of its files


def doc_text(doc) -> str:
  """A corpus entry as text: a string, or a {"title", "text"} dict (data.corpus.document_text)."""
  if isinstance(doc, str):
    return doc
  if isinstance(doc, dict) and "text" in doc:
    return document_text(doc, f"document {str(doc)[:60]!r}")
  raise GritJaxError(f"document {str(doc)[:60]!r}: expected a string or an object with a 'text' field")


def corpus_fingerprint(documents: Sequence[str]) -> str:
  """sha256 of the document texts, in order: what an index was built from."""
  h = hashlib.sha256()
  for d in documents:
    h.update(hashlib.sha256(d.encode("utf-8")).digest())
  return h.hexdigest()[:16]


def model_identity(model) -> dict:
  """What an index records of the model that built it: its directory (informative) and weights fingerprint."""
  return {"name": getattr(model, "name_or_path", None), "weights": model.weights_fingerprint()}


@dataclasses.dataclass
class RagIndex:
  """Document embeddings [N, D] (float32, top-k by dot product) and, optionally, each document's KV cache from the
  same embedding pass, stored flat: k/v [L, total_tokens, KVH, Dh] with offsets [N+1] into the token axis.
  `model` and `corpus` say what it was built from (model_identity, corpus_fingerprint)."""
  documents: list[str]
  embeddings: np.ndarray
  causal: bool                      # attention of the embedding passes (caches are only valid for that mode)
  cache_k: np.ndarray | None = None
  cache_v: np.ndarray | None = None
  cache_offsets: np.ndarray | None = None
  model: dict | None = None
  corpus: str | None = None

  @property
  def has_cache(self) -> bool:
    return self.cache_k is not None

  def check_model(self, model, where: str = "index") -> None:
    """A GritJaxError unless this index was built by `model` (same weights fingerprint)."""
    if self.model is None:
      raise GritJaxError(f"{where}: records no model; rebuild it")
    if self.model.get("weights") != model.weights_fingerprint():
      raise GritJaxError(f"{where}: built with model {self.model.get('name')} (weights {self.model.get('weights')}), "
                         f"not with this model {getattr(model, 'name_or_path', None)} (weights "
                         f"{model.weights_fingerprint()}): rebuild it from the corpus")

  def search(self, query_emb: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k], scores [Q, k]) by dot product, best first."""
    scores_QN = np.asarray(query_emb, np.float32) @ self.embeddings.T
    k = min(k, scores_QN.shape[1])
    top_Qk = np.argsort(-scores_QN, axis=1, kind="stable")[:, :k]
    return top_Qk, np.take_along_axis(scores_QN, top_Qk, axis=1)

  def doc_cache(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(k, v) [L, n_i, KVH, Dh] of document i (positions 0..n_i-1)."""
    if not self.has_cache:
      raise GritJaxError("this index was built without KV caches (build_index(..., with_cache=True))")
    a, b = int(self.cache_offsets[i]), int(self.cache_offsets[i + 1])
    return self.cache_k[:, a:b], self.cache_v[:, a:b]

  def save(self, path: str) -> None:
    """Write `path/` (embeddings.npy, documents.jsonl, kv_cache.npz, index.json); each file atomically, index.json
    last (an index without it is not one)."""
    if os.path.exists(path) and not os.path.isdir(path):
      raise GritJaxError(f"{path}: exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, "embeddings.npy"), lambda f: np.save(f, self.embeddings), "wb")
    atomic_write(os.path.join(path, "documents.jsonl"),
                 lambda f: f.writelines(json.dumps({"text": d}) + "\n" for d in self.documents))
    meta = {"version": INDEX_VERSION, "causal": self.causal, "num_documents": len(self.documents),
            "cache": self.has_cache, "model": self.model, "corpus": self.corpus}
    names = ["embeddings.npy", "documents.jsonl"] + (["kv_cache.npz"] if self.has_cache else [])
    if self.has_cache:
      dtype = str(self.cache_k.dtype)
      view = (lambda a: a.view(np.uint16)) if dtype == "bfloat16" else (lambda a: a)  # npz has no bfloat16
      meta["cache_dtype"] = dtype
      atomic_write(os.path.join(path, "kv_cache.npz"),
                   lambda f: np.savez(f, k=view(self.cache_k), v=view(self.cache_v), offsets=self.cache_offsets), "wb")
    meta["sha256"] = {n: sha256_file(os.path.join(path, n)) for n in names}  # checked at load
    write_json(os.path.join(path, "index.json"), meta, indent=1)

  @staticmethod
  def exists(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "index.json"))

  @classmethod
  def load(cls, path: str) -> "RagIndex":
    """Every damaged or missing file is a GritJaxError naming it."""
    meta_path = os.path.join(path, "index.json")
    meta = read_json(meta_path, "index metadata")
    if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
      raise GritJaxError(f"{meta_path}: index version {meta.get('version') if isinstance(meta, dict) else None}, "
                         f"expected {INDEX_VERSION}: rebuild the index")
    for key in ("causal", "num_documents", "cache", "model", "corpus", "sha256"):
      if key not in meta:
        raise GritJaxError(f"{meta_path}: missing key {key!r}")
    names = ["embeddings.npy", "documents.jsonl"] + (["kv_cache.npz"] if meta["cache"] else [])
    for name in names:  # an edited document, swapped rows or flipped bytes would be served as if built so
      file = os.path.join(path, name)
      want = meta["sha256"].get(name) if isinstance(meta["sha256"], dict) else None
      try:
        got = sha256_file(file)
      except OSError as e:
        raise GritJaxError(f"{file}: cannot read ({e.strerror or e})") from e
      if got != want:
        raise GritJaxError(f"{file}: does not match the sha256 in {meta_path} (edited or damaged): rebuild the index")
    docs_path = os.path.join(path, "documents.jsonl")
    docs = []
    try:
      with open(docs_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
          if line.strip():
            try:
              docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
              raise GritJaxError(f"{docs_path}:{n}: not an index document row ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
      raise GritJaxError(f"{docs_path}: cannot read ({e})") from e
    emb_path = os.path.join(path, "embeddings.npy")
    try:
      emb = np.load(emb_path)
    except (OSError, ValueError, EOFError) as e:
      raise GritJaxError(f"{emb_path}: cannot read ({e})") from e
    if emb.ndim != 2 or emb.dtype != np.float32:
      raise GritJaxError(f"{emb_path}: expected float32 [N, D], got {emb.dtype} {emb.shape}")
    index = cls(docs, emb, bool(meta["causal"]), model=meta["model"], corpus=meta["corpus"])
    if meta["cache"]:
      kv_path = os.path.join(path, "kv_cache.npz")
      try:
        with np.load(kv_path) as z:
          k, v, offsets = z["k"], z["v"], z["offsets"]
      except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise GritJaxError(f"{kv_path}: cannot read the KV caches ({e})") from e
      if meta.get("cache_dtype") == "bfloat16":
        k, v = k.view(jnp.bfloat16), v.view(jnp.bfloat16)
      if k.shape != v.shape or k.ndim != 4 or offsets[-1] != k.shape[1]:
        raise GritJaxError(f"{kv_path}: caches disagree in shape (k {k.shape}, v {v.shape}, offsets end "
                           f"{offsets[-1]})")
      index.cache_k, index.cache_v, index.cache_offsets = k, v, offsets
    if not len(docs) == emb.shape[0] == meta["num_documents"] or (
        index.has_cache and len(index.cache_offsets) != len(docs) + 1):
      raise GritJaxError(f"{path}: documents ({len(docs)}), embeddings ({emb.shape[0]}), caches and index.json "
                         f"({meta['num_documents']}) disagree in count")
    return index


def embed_tokens(model, texts: Sequence[str], max_length: int):
  """(ids, pool_mask) of `<s><|embed|>\\n{text}`: the reference embeds RAG queries and documents without an
  instruction, and that same sequence is the cached prefix. Texts cut to max_length are counted in the model's
  truncation report."""
  tokens = encode_lib.tokenize(model, texts, "", max_length)
  model.count_truncation(tokens, max_length)
  return tokens


def build_index(model, documents: Sequence, with_cache: bool = True, batch_size: int = 16,
                max_length: int | None = None, attn: str | None = None,
                show_progress_bar: bool | None = None) -> RagIndex:
  """Embed a corpus; with `with_cache`, keep each document's KV states from that same pass (Doc Caching costs no
  extra compute at index time). max_length: None = the model's embedding max length (GritLM.max_length).
  show_progress_bar: None = a bar ("Indexing") when the corpus takes more than one batch (documents run to
  thousands of tokens, so a few hundred of them take long already)."""
  docs = [doc_text(d) for d in documents]
  if not docs:
    raise GritJaxError("empty corpus")
  causal = model.embedding_causal(attn)
  max_length = model.max_length(max_length)
  tokens = embed_tokens(model, docs, max_length)
  built = dict(model=model_identity(model), corpus=corpus_fingerprint(docs))
  bar = dict(show_progress_bar=len(docs) > batch_size if show_progress_bar is None else show_progress_bar,
             desc="Indexing")
  if not with_cache:
    return RagIndex(docs, encode_lib.encode_tokens(model, tokens, batch_size, max_length, causal=causal, **bar),
                    causal, **built)
  emb, caches = encode_lib.encode_tokens(model, tokens, batch_size, max_length, causal=causal, with_cache=True,
                                         **bar)
  offsets = np.cumsum([0] + [k.shape[1] for k, _ in caches]).astype(np.int64)
  return RagIndex(docs, emb, causal, np.concatenate([k for k, _ in caches], axis=1),
                  np.concatenate([v for _, v in caches], axis=1), offsets, **built)
