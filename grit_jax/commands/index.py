"""`grit-jax index | search`: a corpus encoded into a FAISS index (resumable, one process per host), and search.

  grit-jax index  --model M --corpus a.jsonl [b.jsonl ...] --out DIR [--faiss flat|ivfpq|hnsw]
                  [--quantize none|int8|binary] [--shard-rows 4096]          # rerun the same command = resume
  grit-jax index  ... --coordinator HOST:PORT --num_processes P --process_id I  # or --distributed=yes on a TPU VM
  grit-jax search --index DIR --query "..." [--query ...] [-k 10] [--model M] [--json]
  grit-jax mine   --model M --data train.jsonl --corpus a.jsonl ... --index DIR --out mined.jsonl
                  [--negatives 7 --range-min 0 --range-max 50 --margin 0.0 --margin-type relative]

Corpus rows: {"id": ..., "text": ..., "title": ... (optional)}. Every corpus file is checked (a row without id or
text, a duplicate id: an error naming the file and line) before the model is loaded; see
inference.corpus_index for the folder's layout and what a resume checks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from grit_jax.commands import infer
from grit_jax.errors import GritJaxError


def _faiss_args(p: argparse.ArgumentParser) -> None:
  from grit_jax.inference import vector_search as vs
  d = vs.FaissSettings()
  p.add_argument("--faiss", default=d.kind, choices=vs.KINDS, help="flat = exact inner product")
  p.add_argument("--quantize", default=d.quantize, choices=vs.QUANTIZE,
                 help="flat only: int8 (scalar quantizer, 1/4 of the memory) or binary (signs, Hamming; 1/32)")
  p.add_argument("--nlist", type=int, default=d.nlist, help="ivfpq: inverted lists (0 = about 4 sqrt(N))")
  p.add_argument("--pq-m", type=int, default=d.pq_m, help="ivfpq: PQ sub-quantizers (0 = dim / 4)")
  p.add_argument("--pq-bits", type=int, default=d.pq_bits, help="ivfpq: bits per sub-quantizer code")
  p.add_argument("--nprobe", type=int, default=d.nprobe, help="ivfpq: lists visited per query")
  p.add_argument("--hnsw-m", type=int, default=d.hnsw_m, help="hnsw: graph degree")
  p.add_argument("--ef-search", type=int, default=d.ef_search, help="hnsw: candidate list size at search")
  p.add_argument("--rescore", type=int, default=d.rescore,
                 help="approximate kinds: rescore RESCORE x k candidates with the float vectors (0 = off)")


def _faiss_settings(a):
  from grit_jax.inference import vector_search as vs
  return vs.FaissSettings(kind=a.faiss, quantize=a.quantize, nlist=a.nlist, pq_m=a.pq_m, pq_bits=a.pq_bits,
                          nprobe=a.nprobe, hnsw_m=a.hnsw_m, ef_search=a.ef_search, rescore=a.rescore)


def index_main(argv: list[str]) -> int:
  from grit_jax.commands import train
  from grit_jax.inference import corpus_index as ci
  p = infer._parser("grit-jax index", "Encode a corpus into a FAISS index (resumable; one process per host).")
  p.add_argument("--corpus", required=True, nargs="+", help="JSONL files of {'id', 'text', 'title'} rows")
  p.add_argument("--out", required=True, help="index folder (rerunning the same command resumes)")
  p.add_argument("--shard-rows", type=infer._positive("--shard-rows"), default=4096,
                 help="documents per shard (the unit of resume)")
  p.add_argument("--batch-size", type=infer._positive("--batch-size"), default=64, help="texts per forward pass")
  infer.add_max_length(p, "document")
  infer._add_attn(p)
  infer.add_packing(p)
  infer.add_shard_weights(p)
  _faiss_args(p)
  p.add_argument("--distributed", default="auto", choices=("auto", "yes", "no"),
                 help="jax.distributed.initialize, as `grit-jax train`")
  p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-process without a TPU VM)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction, help="progress bar")
  a = p.parse_args(argv)
  fs = _faiss_settings(a)
  fs.check()  # the size-independent checks, before any work (build_faiss checks again with the real size)
  if os.path.exists(a.out) and not os.path.isdir(a.out):
    raise GritJaxError(f"--out {a.out}: exists and is not a directory")
  infer.check_writable_folder(os.path.dirname(os.path.abspath(a.out)), "--out", a.out)
  ci.read_corpus(a.corpus)  # bad rows and duplicate ids: named before the model loads
  train.init_distributed(a)
  import jax
  model = infer._load(a.model, a.attn, a.shard_weights)
  barrier = None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    barrier = lambda: multihost_utils.sync_global_devices("grit-jax index: every share encoded")  # noqa: E731
  index = ci.build(model, a.corpus, a.out, fs, process_index=jax.process_index(), process_count=jax.process_count(),
                   barrier=barrier, shard_rows=a.shard_rows, batch_size=a.batch_size, max_length=a.max_length,
                   attn=a.attn, packing=a.packing, show_progress_bar=a.progress)
  if index is not None:
    print(f"wrote {a.out}: {len(index)} documents, {index.embeddings.shape[1]} dims, {fs.kind}"
          f"{'' if fs.quantize == 'none' else ' ' + fs.quantize}")
  return 0


def search_main(argv: list[str]) -> int:
  from grit_jax.inference import corpus_index as ci
  p = argparse.ArgumentParser(prog="grit-jax search", description="Search a corpus index (`grit-jax index`).",
                              formatter_class=infer._Help)
  p.add_argument("--index", required=True, help="index folder written by `grit-jax index`")
  p.add_argument("--query", required=True, action="append", help="a query (repeat for a batch)")
  p.add_argument("-k", type=infer._positive("-k"), default=10, help="documents per query")
  p.add_argument("--model", default=None, help="default: the model the index records (its weights are checked)")
  p.add_argument("--instruction", default=None, help="query instruction; default: the model's query_instruction")
  p.add_argument("--on-device", action="store_true", help="exact top-k over the embeddings on the local devices")
  p.add_argument("--nprobe", type=int, default=None, help="ivfpq: override the index's lists visited per query")
  p.add_argument("--rescore", type=int, default=None, help="override the index's rescoring factor")
  p.add_argument("--text", action="store_true", help="print each document's text (read from the corpus files)")
  p.add_argument("--json", action="store_true", help="one JSON line per query")
  infer.add_shard_weights(p)
  a = p.parse_args(argv)
  index = ci.CorpusIndex.load(a.index)  # damaged files: named before the model loads
  overrides = {k: v for k, v in (("nprobe", a.nprobe), ("rescore", a.rescore)) if v is not None}
  if overrides:
    index.fs = dataclasses.replace(index.fs, **overrides)
    index.fs.check(index.embeddings.shape[1])
  if a.text:
    index.check_corpus()
  model_path = a.model or index.model.get("name")
  if not model_path:
    raise GritJaxError(f"--index {a.index} records no model path: give --model")
  model = infer._load(model_path, shard_weights=a.shard_weights)
  hits = ci.search(model, a.query, index, a.k, instruction=a.instruction, on_device=a.on_device,
                   return_text=a.text)
  for q, hs in zip(a.query, hits):
    if a.json:
      print(json.dumps({"query": q, "hits": hs}, ensure_ascii=False))
      continue
    print(f"query: {q}")
    for rank, h in enumerate(hs, 1):
      print(f"  {rank:3d}. {h['score']:.4f}  {h['id']}" + (f"  {h['text'][:120]}" if a.text else ""))
  return 0


def mine_main(argv: list[str]) -> int:
  from grit_jax.inference import corpus_index as ci
  from grit_jax.inference import mine as mine_lib
  p = infer._parser("grit-jax mine", "Mine hard negatives for a training file from a corpus index.")
  p.add_argument("--data", required=True, help="training JSONL of embedding rows ({'query', 'pos', 'neg'})")
  p.add_argument("--corpus", required=True, nargs="+", help="JSONL files of {'id', 'text'} rows")
  p.add_argument("--index", required=True, help="corpus index folder (built, or resumed, as `grit-jax index`)")
  p.add_argument("--out", required=True, help="the new training JSONL (written atomically)")
  p.add_argument("--negatives", type=infer._positive("--negatives"), default=7, help="negatives per row")
  p.add_argument("--range-min", type=int, default=0, help="first rank (0-based) a negative may come from")
  p.add_argument("--range-max", type=int, default=50, help="ranks searched")
  p.add_argument("--margin", type=float, default=0.0, help="drop candidates within this of the positive's score")
  p.add_argument("--margin-type", default="relative", choices=mine_lib.MARGIN_TYPES)
  p.add_argument("--shard-rows", type=infer._positive("--shard-rows"), default=4096, help="as `grit-jax index`")
  p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction, help="progress bar")
  a = p.parse_args(argv)
  infer.check_output_file(a.out, "--out", ".jsonl")
  rows = mine_lib.read_rows(a.data)
  ci.read_corpus(a.corpus)
  model = infer._load(a.model)
  index = ci.build(model, a.corpus, a.index, shard_rows=a.shard_rows, show_progress_bar=a.progress)
  mined, short = mine_lib.mine(model, rows, index, a.negatives, a.range_min, a.range_max, a.margin, a.margin_type)
  from grit_jax.fileio import atomic_write
  atomic_write(a.out, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in mined))
  scored = sum(any(k in r for k in mine_lib.TEACHER_KEYS) for r in rows)
  empty = sum(not r["neg"] for r in mined)
  print(f"wrote {a.out}: {len(mined)} rows; {short} got fewer than {a.negatives} negatives"
        + (f" ({empty} none: training skips such a row, counted, or refuses it with data.bad_input=error)"
           if empty else "")
        + (f"; teacher scores dropped from {scored} rows (they scored the old negatives)" if scored else ""))
  return 0
