"""Searching embedding matrices: FAISS indexes (exact inner product, IVF-PQ, HNSW, int8 / binary codes with float
rescoring) and an exact blocked top-k on the local devices over a row-sharded matrix. What `grit-jax index` builds
and `grit-jax search` / GritLM.search query (inference.corpus_index keeps the files around them)."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from grit_jax.errors import GritJaxError

KINDS = ("flat", "ivfpq", "hnsw")
QUANTIZE = ("none", "int8", "binary")


# ---------------------------------------------------------------------------------------------------------------
# FAISS


@dataclasses.dataclass(frozen=True)
class FaissSettings:
  kind: str = "flat"         # flat | ivfpq | hnsw
  quantize: str = "none"     # none | int8 | binary (flat only)
  nlist: int = 0             # ivfpq: inverted lists (0 = about 4 sqrt(N))
  pq_m: int = 0              # ivfpq: sub-quantizers (0 = D / 4: 4 dims per byte)
  pq_bits: int = 8
  nprobe: int = 32           # ivfpq: lists searched
  hnsw_m: int = 32
  ef_search: int = 128
  ef_construction: int = 80
  rescore: int = 4           # approximate kinds: rescore rescore x k candidates with the float vectors (0 = off)

  def check(self, dim: int | None = None) -> None:
    """A GritJaxError naming the flag; dim None: the checks that need no embedding size (before the model)."""
    if self.kind not in KINDS:
      raise GritJaxError(f"--faiss {self.kind}: expected one of {KINDS}")
    if self.quantize not in QUANTIZE:
      raise GritJaxError(f"--quantize {self.quantize}: expected one of {QUANTIZE}")
    if self.quantize != "none" and self.kind != "flat":
      raise GritJaxError(f"--quantize {self.quantize} applies to --faiss flat ({self.kind} compresses or "
                         "graphs the vectors itself)")
    if dim is not None and self.quantize == "binary" and dim % 8:
      raise GritJaxError(f"--quantize binary: the embedding size {dim} is not a multiple of 8")
    if dim is not None and self.kind == "ivfpq" and self.pq_m and dim % self.pq_m:
      raise GritJaxError(f"--pq-m {self.pq_m}: must divide the embedding size {dim}")
    for name in ("nprobe", "hnsw_m", "ef_search", "ef_construction", "pq_bits"):
      if getattr(self, name) < 1:
        raise GritJaxError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
    if self.rescore < 0:
      raise GritJaxError(f"--rescore {self.rescore}: must be >= 0")

  @property
  def exact(self) -> bool:
    return self.kind == "flat" and self.quantize == "none"


def build_faiss(emb_ND: np.ndarray, fs: FaissSettings, seed: int = 0):
  """The FAISS index of fs over emb_ND (inner product; binary: Hamming over the signs)."""
  import faiss
  N, D = emb_ND.shape
  fs.check(D)
  emb_ND = np.ascontiguousarray(emb_ND, np.float32)
  if fs.quantize == "binary":
    index = faiss.IndexBinaryFlat(D)
    index.add(np.packbits(emb_ND > 0, axis=1))
    return index
  if fs.quantize == "int8":
    index = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
  elif fs.kind == "flat":
    index = faiss.IndexFlatIP(D)
  elif fs.kind == "hnsw":
    index = faiss.IndexHNSWFlat(D, fs.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = fs.ef_construction
  else:
    nlist = fs.nlist or max(1, min(N // 39, int(4 * np.sqrt(N))))  # faiss wants >= 39 training points per list
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(D), D, nlist, fs.pq_m or D // 4, fs.pq_bits,
                             faiss.METRIC_INNER_PRODUCT)
  if not index.is_trained:
    # enough points for the coarse lists and the PQ codebooks (256 centroids each), at most N
    rows = np.random.default_rng(seed).choice(N, min(N, max(64 * getattr(index, "nlist", 1), 2 ** 16)),
                                              replace=False)
    index.train(emb_ND[np.sort(rows)])
  index.add(emb_ND)
  return index


def faiss_search(index, fs: FaissSettings, emb_ND: np.ndarray, q_QD: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows [Q, k] int64, scores [Q, k] float32), best first; approximate kinds rescored by emb_ND (a memory map:
  only the candidates' rows are read). Fewer than k rows in the index: k = N."""
  import faiss
  q_QD = np.ascontiguousarray(q_QD, np.float32)
  k = min(k, emb_ND.shape[0])
  want = k if fs.exact or not fs.rescore else min(emb_ND.shape[0], fs.rescore * k)
  if fs.kind == "ivfpq":
    faiss.extract_index_ivf(index).nprobe = fs.nprobe
  elif fs.kind == "hnsw":
    index.hnsw.efSearch = max(fs.ef_search, want)
  if fs.quantize == "binary":
    _, rows = index.search(np.packbits(q_QD > 0, axis=1), want)
  else:
    scores, rows = index.search(q_QD, want)
  if fs.exact or (not fs.rescore and fs.quantize != "binary"):
    return rows[:, :k], scores[:, :k]
  return rescore(emb_ND, q_QD, rows, k)


def rescore(emb_ND: np.ndarray, q_QD: np.ndarray, rows_QC: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The best k of each query's candidate rows by the exact inner product with the float vectors."""
  rows_QC = np.where(rows_QC < 0, 0, rows_QC)  # faiss pads with -1 when it finds fewer; scored -inf below
  uniq, inv = np.unique(rows_QC, return_inverse=True)
  cand_UD = np.asarray(emb_ND[uniq], np.float32)  # reads only these rows of a memory map
  scores_QC = np.einsum("qd,qcd->qc", q_QD, cand_UD[inv.reshape(rows_QC.shape)])
  order = np.argsort(-scores_QC, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(rows_QC, order, 1), np.take_along_axis(scores_QC, order, 1).astype(np.float32)


def index_nbytes(index) -> int:
  """Bytes of the serialized index (what search holds in memory)."""
  import faiss
  ser = faiss.serialize_index_binary(index) if isinstance(index, faiss.IndexBinary) else faiss.serialize_index(index)
  return int(ser.nbytes)


# ---------------------------------------------------------------------------------------------------------------
# exact top-k on device


@functools.lru_cache(maxsize=None)
def _device_topk_fn(mesh, k: int, block: int, n_valid: int):
  import jax
  import jax.numpy as jnp
  from jax import lax
  P = jax.P

  def local(q_QD, e_nD):  # e_nD: this device's rows, a multiple of `block`
    n = e_nD.shape[0]
    base = lax.axis_index("corpus") * n
    Q = q_QD.shape[0]

    def step(carry, b):
      best_s, best_i = carry
      e_bD = lax.dynamic_slice_in_dim(e_nD, b * block, block)
      s_Qb = jnp.einsum("qd,bd->qb", q_QD, e_bD, preferred_element_type=jnp.float32)
      rows_b = base + b * block + jnp.arange(block)
      s_Qb = jnp.where(rows_b[None] < n_valid, s_Qb, -jnp.inf)  # padding rows never win
      s = jnp.concatenate([best_s, s_Qb], 1)
      i = jnp.concatenate([best_i, jnp.broadcast_to(rows_b, (Q, block))], 1)
      top_s, pos = lax.top_k(s, k)
      return (top_s, jnp.take_along_axis(i, pos, 1)), None

    init = lax.pcast((jnp.full((Q, k), -jnp.inf, jnp.float32), jnp.zeros((Q, k), jnp.int32)), ("corpus",),
                     to="varying")  # the carry differs per device, as the scan's outputs do
    (s_Qk, i_Qk), _ = lax.scan(step, init, jnp.arange(n // block))
    s_all = lax.all_gather(s_Qk, "corpus", axis=1, tiled=True, to="invarying")  # [Q, devices * k]
    i_all = lax.all_gather(i_Qk, "corpus", axis=1, tiled=True, to="invarying")
    top_s, pos = lax.top_k(s_all, k)
    return top_s, jnp.take_along_axis(i_all, pos, 1)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("corpus")), out_specs=(P(), P())))


def device_corpus(emb_ND: np.ndarray, devices=None, block: int = 4096):
  """emb_ND placed on `devices` (default: every local one), rows split evenly (zero rows appended to a multiple of
  devices x block): (the sharded array, the mesh, block, N). Hold it and pass it to device_topk per query batch."""
  import jax
  from jax.sharding import Mesh, NamedSharding
  devices = list(devices if devices is not None else jax.local_devices())
  N, D = emb_ND.shape
  block = max(1, min(block, -(-N // len(devices))))
  per = -(-N // (len(devices) * block)) * block
  padded = np.zeros((per * len(devices), D), np.float32)
  padded[:N] = emb_ND
  mesh = Mesh(np.asarray(devices), ("corpus",))
  return jax.device_put(padded, NamedSharding(mesh, jax.P("corpus"))), mesh, block, N


def device_topk(corpus, q_QD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact (rows [Q, k], scores [Q, k]) by inner product over a device_corpus: each device scans its rows in blocks
  keeping a running top-k (memory: Q x block scores), then the devices' k best are gathered and merged."""
  emb, mesh, block, N = corpus
  k = min(k, N)
  s, i = _device_topk_fn(mesh, k, block, N)(np.asarray(q_QD, np.float32), emb)
  return np.asarray(i).astype(np.int64), np.asarray(s)
