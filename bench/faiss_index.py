"""The corpus index's FAISS kinds on synthetic vectors, one run, ratios against the exact search: recall@10 (the
share of the exact top 10 found) and queries/s of IVF-PQ (rescored by the float vectors), and recall@10 and
memory of int8 / binary with rescoring. The search code is the index's own (inference.corpus_index: build_faiss,
faiss_search); the float vectors for rescoring are a memory map on disk, as in a built index, and only the
candidates' rows are read.

Vectors: N unit vectors in D dims around C cluster centres (centre + Gaussian noise, then normalised; real
embeddings cluster too, uniform random vectors would be a worst case that no IVF index serves); queries drawn the
same way, not in the corpus.

  .venv/bin/python bench/faiss_index.py [--n 1000000] [--dim 256] [--queries 1000] [--nprobe 32]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

from _common import host  # noqa: F401  (puts the repository on sys.path)

import numpy as np  # noqa: E402

from grit_jax.inference import vector_search as vs  # noqa: E402


def vectors(n: int, dim: int, centres_CD: np.ndarray, rng, noise: float) -> np.ndarray:
  out = np.empty((n, dim), np.float32)
  for s in range(0, n, 100_000):  # in blocks: a 1M x 256 float64 temporary would be 2 GB
    m = min(100_000, n - s)
    x = centres_CD[rng.integers(0, len(centres_CD), m)] + noise * rng.standard_normal((m, dim), np.float32)
    out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def recall(rows_Qk: np.ndarray, truth_Qk: np.ndarray) -> float:
  return float(np.mean([len(set(a) & set(b)) / truth_Qk.shape[1] for a, b in zip(rows_Qk, truth_Qk)]))


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=1_000_000)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--clusters", type=int, default=4096)
  p.add_argument("--noise", type=float, default=1.0, help="per-dimension noise around a centre (unit-ish centres)")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--nlist", type=int, default=4096)
  p.add_argument("--pq-m", type=int, default=64)
  p.add_argument("--nprobe", type=int, default=32)
  p.add_argument("--rescore", type=int, default=4)
  p.add_argument("--ivf-sweep", default="", help="more IVF-PQ search settings on the same built index, "
                 "'NPROBE:RESCORE,...' (e.g. 32:10,64:10,64:25)")
  p.add_argument("--kinds", default="ivfpq,int8,binary")
  a = p.parse_args()
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((a.clusters, a.dim), np.float32) / np.sqrt(a.dim)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "embeddings.npy")
    mm = np.lib.format.open_memmap(path, "w+", np.float32, (a.n, a.dim))
    mm[:] = vectors(a.n, a.dim, centres, rng, a.noise / np.sqrt(a.dim))
    mm.flush()
    emb = np.load(path, mmap_mode="r")
    q = vectors(a.queries, a.dim, centres, rng, a.noise / np.sqrt(a.dim))
    ram = np.asarray(emb)
    print(f"{a.n} x {a.dim} float32 vectors ({ram.nbytes / 2**20:.0f} MiB), {a.queries} queries, k={a.k}, "
          f"{a.clusters} clusters")
    flat_fs = vs.FaissSettings()
    flat, t_build = timed(lambda: vs.build_faiss(ram, flat_fs))
    (truth, _), t_exact = timed(lambda: vs.faiss_search(flat, flat_fs, emb, q, a.k))
    flat_bytes = vs.index_nbytes(flat)
    print(f"exact (flat IP): {a.queries / t_exact:.0f} queries/s, {flat_bytes / 2**20:.0f} MiB")
    rows = []
    kinds = {
        "ivfpq": vs.FaissSettings(kind="ivfpq", nlist=a.nlist, pq_m=a.pq_m, nprobe=a.nprobe, rescore=a.rescore),
        "int8": vs.FaissSettings(quantize="int8", rescore=a.rescore),
        "binary": vs.FaissSettings(quantize="binary", rescore=a.rescore),
    }
    for name in a.kinds.split(","):
      fs = kinds[name]
      index, t_build = timed(lambda: vs.build_faiss(ram, fs))
      settings = [(name, fs)]
      if name == "ivfpq":  # the same built index searched with other nprobe / rescore settings
        for item in filter(None, a.ivf_sweep.split(",")):
          nprobe, rescore = map(int, item.split(":"))
          settings.append((f"ivfpq {nprobe}:{rescore}", dataclasses.replace(fs, nprobe=nprobe, rescore=rescore)))
      for label, fs in settings:
        vs.faiss_search(index, fs, emb, q[:10], a.k)  # warm up
        (got, _), t = timed(lambda: vs.faiss_search(index, fs, emb, q, a.k))
        nbytes = vs.index_nbytes(index)
        rows.append((label, recall(got, truth), (a.queries / t) / (a.queries / t_exact), nbytes / flat_bytes,
                     t_build))
    print(f"{'kind':16} {'recall@10':>9} {'qps/exact':>10} {'memory/flat':>11} {'build s':>8}")
    for name, r, speed, mem, tb in rows:
      print(f"{name:16} {r:9.4f} {speed:9.1f}x {mem:11.3f} {tb:8.1f}")
    print(f"memory = the serialized FAISS index held by search; the float vectors stay on disk, and rescoring reads "
          f"{a.rescore} x {a.k} rows per query ({a.rescore * a.k * a.dim * 4 / 1024:.0f} KiB)")
    print(f"ivfpq: nlist {a.nlist}, pq_m {a.pq_m} (x8 bits), nprobe {a.nprobe}; rescore {a.rescore} x k candidates "
          "with the float vectors (memory map)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
