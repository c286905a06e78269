"""Corpus index (`grit-jax index | search`, GritLM.search, rag over it) on a tiny random model and corpora of a few
dozen rows: embeddings equal `encode`, top-k equal numpy's, a 2-process split equal to one process, resume after
SIGKILL at several points equal to an uninterrupted run, bad input named."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from grit_jax.errors import GritJaxError
from grit_jax.inference import corpus_index as ci
from grit_jax.inference import corpus_shards
from grit_jax.inference import vector_search as vs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("river stone paris light sugar mountain cloud engine paper music garden winter bridge coffee "
         "planet forest window silver ocean market").split()


def texts(n, seed):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, rng.integers(3, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
  from grit_jax.data.tokenizer import Tokenizer
  from grit_jax.inference.gritlm import GritLM
  from grit_jax.modeling import get_config, init_params
  cfg = get_config("tiny_mistral", dtype="float32")
  return GritLM(cfg, init_params(cfg, jax.random.PRNGKey(0)), Tokenizer(os.path.join(ROOT, "data", "tokenizer.model")))


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("model"))
  model.save_pretrained(d)
  from grit_jax.inference.gritlm import GritLM
  loaded = GritLM.from_pretrained(d)
  assert loaded.weights_fingerprint() == model.weights_fingerprint()
  return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two files, 17 + 12 rows (ids: a string with a title, and integers), 7 shards of 5 rows."""
  d = tmp_path_factory.mktemp("corpus")
  a, b = d / "a.jsonl", d / "b.jsonl"
  ta, tb = texts(17, 0), texts(12, 1)
  a.write_text("".join(json.dumps({"id": f"a{i}", "title": "T", "text": t}) + "\n" for i, t in enumerate(ta)))
  b.write_text("\n".join(json.dumps({"_id": 100 + i, "text": t}) for i, t in enumerate(tb)) + "\n\n")
  return [str(a), str(b)], [f"a{i}" for i in range(17)] + [str(100 + i) for i in range(12)], \
      ["T " + t for t in ta] + tb


@pytest.fixture(scope="module")
def built(model, corpus, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("idx") / "index")
  return ci.build(model, corpus[0], out, shard_rows=5, show_progress_bar=False)


def test_index_equals_encode_and_top_k_equals_numpy(model, corpus, built):
  paths, ids, docs = corpus
  ref = model.encode(docs)
  np.testing.assert_allclose(np.asarray(built.embeddings), ref, atol=1e-5)
  assert list(built.ids) == ids and [built.document(r) for r in (0, 16, 17, 28)] == [docs[0], docs[16], docs[17],
                                                                                     docs[28]]
  q = model.encode(["river paris", "winter ocean coffee"])
  top = np.argsort(-(q @ ref.T), axis=1, kind="stable")[:, :5]
  rows, scores = built.search(q, 5)
  np.testing.assert_array_equal(rows, top)
  np.testing.assert_allclose(scores, np.take_along_axis(q @ ref.T, top, 1), atol=1e-5)
  hits = model.search(["river paris", "winter ocean coffee"], built.path, k=5, instruction="")
  assert [[h["id"] for h in hs] for hs in hits] == [[ids[r] for r in rr] for rr in top]
  one = model.search("river paris", built, k=2, instruction="", return_text=True)
  assert [h["text"] for h in one] == [docs[r] for r in top[0, :2]]
  with open(os.path.join(built.path, "manifest-00000.json")) as f:
    assert len(json.load(f)["shards"]) == 7


def test_two_processes_split_the_shards_and_equal_one(model, corpus, built, tmp_path):
  out = str(tmp_path / "two")
  files = ci.read_corpus(corpus[0])
  s0 = corpus_shards.encode_corpus(model, files, out, shard_rows=5, process_index=0, process_count=2,
                                  show_progress_bar=False)
  with pytest.raises(GritJaxError, match=r"3 of 7 shards not encoded yet \(first: shards/00000-0000000005"):
    ci.finish(out, files, s0, vs.FaissSettings())
  corpus_shards.encode_corpus(model, files, out, shard_rows=5, process_index=1, process_count=2,
                             show_progress_bar=False)
  shards = [set(json.load(open(os.path.join(out, f"manifest-0000{p}.json")))["shards"]) for p in (0, 1)]
  assert len(shards[0]) == 4 and len(shards[1]) == 3 and not shards[0] & shards[1]
  two = ci.finish(out, files, s0, vs.FaissSettings())
  np.testing.assert_array_equal(np.asarray(two.embeddings), np.asarray(built.embeddings))
  assert two.ids == built.ids


def _index_cli(args, kill=None):
  cmd = [sys.executable, os.path.join(ROOT, "tests", "kill_during_index.py"), *(kill or ("none", "0")), *args]
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_resume_after_kill_loses_and_duplicates_nothing(model_dir, corpus, built, tmp_path):
  out = str(tmp_path / "killed")
  args = ["--model", model_dir, "--corpus", *corpus[0], "--out", out, "--shard-rows", "5", "--no-progress"]
  # kill: half-written 3rd shard; then the 1st shard of the resume renamed but not committed (a kill after a
  # commit is the plain case: the driver's "commit" phase)
  for phase, n in (("write", 3), ("renamed", 1)):
    r = _index_cli(args, (phase, str(n)))
    assert r.returncode == -9, (phase, r.stderr[-2000:])
  done = corpus_shards.done_shards(out)
  assert len(done) == 2  # 2 before the first kill, none in the second run
  r = _index_cli(args)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "wrote" in r.stdout and "29 documents" in r.stdout
  resumed = ci.CorpusIndex.load(out)
  assert resumed.ids == built.ids
  np.testing.assert_allclose(np.asarray(resumed.embeddings), np.asarray(built.embeddings), atol=1e-6)
  assert sorted(os.listdir(os.path.join(out, "shards"))) == sorted(c.name for c in corpus_shards.chunks(
      ci.read_corpus(corpus[0]), 5))  # no temporary file left, no shard twice


def test_every_entry_point_joins_titles_as_gritlm(tmp_path):
  """One rule for a document's title: corpus files (index, mine), embed/rag's --input/--corpus, RAG documents and
  encode_corpus all give gritlm's encode_corpus strings (an empty title still joined, no title key: the text)."""
  from grit_jax.commands import infer as cli
  from grit_jax.inference import hf_compat, rag_index
  rows = [{"id": 1, "title": "Paris", "text": "on the Seine"}, {"id": 2, "text": "no title"},
          {"id": 3, "title": "", "text": "empty title"}]
  want = ["Paris on the Seine", "no title", " empty title"]
  src = tmp_path / "c.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert [t for cf in ci.read_corpus([str(src)]) for t in cf.texts(0, len(cf.ids))] == want
  assert cli.read_texts(str(src)) == want
  assert [rag_index.doc_text(r) for r in rows] == want
  assert hf_compat.corpus_texts(rows) == want
  src.write_text(json.dumps({"id": 1, "title": 7, "text": "x"}) + "\n")
  for read in (lambda: ci.read_corpus([str(src)]), lambda: cli.read_texts(str(src))):
    with pytest.raises(GritJaxError, match=r"c.jsonl:1: key 'title' must be a string"):
      read()


def test_any_id_is_kept_at_its_own_length(model, tmp_path):
  """Ids are stored as UTF-8 bytes + offsets: a 5,000-character id, a NUL, non-ASCII and an empty-looking integer
  come back as written, and ids_utf8.npy holds their bytes, not N rows as wide as the longest."""
  ids = ["x" * 5000, "a\x00b", "caf\u00e9", "7", "short"]
  path = tmp_path / "c.jsonl"
  path.write_text("".join(json.dumps({"id": int(i) if i.isdigit() else i, "text": f"document {n}"}) + "\n"
                          for n, i in enumerate(ids)))
  index = ci.build(model, [str(path)], str(tmp_path / "index"), shard_rows=2, show_progress_bar=False)
  loaded = ci.CorpusIndex.load(index.path)
  assert list(loaded.ids) == ids and loaded.ids[-1] == "short" and loaded.ids[1] == "a\x00b"
  utf8 = np.load(os.path.join(index.path, "ids_utf8.npy"))
  assert utf8.nbytes == sum(len(i.encode()) for i in ids) == 5000 + 3 + 5 + 1 + 5
  hits = model.search("document 1", loaded, k=5, instruction="")
  assert sorted(h["id"] for h in hits) == sorted(ids)


def test_bad_input_is_named(model, model_dir, corpus, built, tmp_path):
  bad = tmp_path / "bad.jsonl"
  for rows, msg in [(['{"id": 1, "text": "x"}', '{"text": "no id"}'], r"bad.jsonl:2: no 'id'"),
                    (['{"id": 1, "text": "x"}', '{"id": 2, "text": " "}'], r"bad.jsonl:2: id 2 has no text"),
                    (['{"id": 1, "text": "x"}', '', '{"id": "1", "text": "y"}'],
                     r"bad.jsonl:3: duplicate id '1', first at .*bad.jsonl:1"),
                    # several ids used twice: the first repeat met in file order is named
                    (['{"id": "a", "text": "x"}', '{"id": "b", "text": "x"}', '{"id": "b", "text": "y"}',
                      '{"id": "a", "text": "y"}'], r"bad.jsonl:3: duplicate id 'b', first at .*bad.jsonl:2")]:
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(GritJaxError, match=msg):
      ci.read_corpus([str(bad)])
  bad.write_bytes(b'\xef\xbb\xbf{"id": 1, "text": "x"}\n')  # a byte-order mark, as Windows editors write
  (cf,) = ci.read_corpus([str(bad)])
  assert list(cf.ids) == ["1"] and cf.texts(0, 1) == ["x"]
  bad.write_text('{"id": 1, "text": "x"}\n{"id": 2, "text": "y"}\n')
  (cf,) = ci.read_corpus([str(bad)])
  bad.write_text('{"id": 1, "text": "x"}\n{"id": 3, "text": "y"}\n')  # edited after it was read
  with pytest.raises(GritJaxError, match=r"bad.jsonl:2: the row changed since the corpus was read \(id '2'\)"):
    cf.texts(0, 2)
  dup = tmp_path / "dup.jsonl"
  dup.write_text('{"id": "a3", "text": "again"}\n')
  with pytest.raises(GritJaxError, match=r"dup.jsonl:1: duplicate id 'a3', first at .*a.jsonl:4"):
    ci.read_corpus([corpus[0][0], str(dup)])
  # a resume with another model, or after a corpus file changed: refused, naming which
  from grit_jax.inference.gritlm import GritLM
  from grit_jax.modeling import init_params
  other = GritLM(model.config, init_params(model.config, jax.random.PRNGKey(1)), model.tokenizer)
  with pytest.raises(GritJaxError, match=r"index_settings.json: started with model .*not this model"):
    ci.build(other, corpus[0], built.path, shard_rows=5, show_progress_bar=False)
  with pytest.raises(GritJaxError, match=r"built with model .*not with this model"):
    other.search("x", built)
  import shutil
  copy_corpus = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
  for src, dst in zip(corpus[0], copy_corpus):
    shutil.copy(src, dst)
  # a damaged shard (one flipped byte) is named when the index is gathered
  shard = os.path.join(built.path, "shards", "00001-0000000005-0000000010.npz")
  data = bytearray(open(shard, "rb").read())
  data[-40] ^= 1
  out = str(tmp_path / "damaged")
  shutil.copytree(built.path, out)
  open(os.path.join(out, "shards", os.path.basename(shard)), "wb").write(bytes(data))
  os.remove(os.path.join(out, ci.META))
  with pytest.raises(GritJaxError, match=r"00001-0000000005-0000000010.npz: does not match the sha256"):
    ci.build(model, corpus[0], out, shard_rows=5, show_progress_bar=False)
  os.remove(os.path.join(out, "shards", os.path.basename(shard)))  # as the message says: deleted, encoded again
  repaired = ci.build(model, corpus[0], out, shard_rows=5, show_progress_bar=False)
  np.testing.assert_allclose(np.asarray(repaired.embeddings), np.asarray(built.embeddings), atol=1e-6)
  # a folder started by a grit_jax that wrote another index format: its shards are not read as this format's
  old = str(tmp_path / "old_format")
  shutil.copytree(built.path, old)
  os.remove(os.path.join(old, ci.META))
  settings = json.load(open(os.path.join(old, "index_settings.json")))
  json.dump(dict(settings, version=1), open(os.path.join(old, "index_settings.json"), "w"))
  with pytest.raises(GritJaxError, match=r"index_settings.json: started by a grit_jax writing index format 1, "
                                         r"this one writes format 2: use another --out"):
    ci.build(model, corpus[0], old, shard_rows=5, show_progress_bar=False)
  # the corpus changed after the build: texts are refused, naming the file
  idx = ci.CorpusIndex.load(built.path)
  idx.meta["corpus"][1]["path"] = copy_corpus[1]
  with open(copy_corpus[1], "a") as f:
    f.write('{"id": "new", "text": "added"}\n')
  with pytest.raises(GritJaxError, match=r"corpus file .*b.jsonl changed since index"):
    idx.document(0)


def test_quantized_and_approximate_search_recall(tmp_path):
  import faiss
  faiss.omp_set_num_threads(1)  # OpenMP threads spin on a loaded 2-core host (10x slower builds)
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((40, 64)).astype(np.float32)
  emb = centres[rng.integers(0, 40, 4000)] + rng.standard_normal((4000, 64)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  q = emb[:50] + 0.3 * rng.standard_normal((50, 64)).astype(np.float32)
  truth = np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :10]
  recall = lambda rows: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])
  got = {}
  for fs in [vs.FaissSettings(quantize="int8"), vs.FaissSettings(quantize="int8", rescore=0),
             vs.FaissSettings(quantize="binary", rescore=10), vs.FaissSettings(quantize="binary", rescore=1),
             vs.FaissSettings(kind="ivfpq", nlist=16, pq_m=32, pq_bits=4, rescore=10),
             vs.FaissSettings(kind="hnsw", hnsw_m=16)]:
    rows, scores = vs.faiss_search(vs.build_faiss(emb, fs), fs, emb, q, 10)
    got[(fs.kind, fs.quantize, fs.rescore)] = recall(rows)
    if fs.rescore:  # rescored: the exact inner products of the rows returned, best first
      np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, emb[rows]), atol=1e-5)
      assert (np.diff(scores, axis=1) <= 0).all()
  assert got[("flat", "int8", 4)] >= 0.99 and got[("flat", "int8", 4)] >= got[("flat", "int8", 0)]
  # binary codes of 64 dims are coarse: rescoring more candidates is what recovers the neighbours
  assert got[("flat", "binary", 10)] >= 0.5 > 0.3 > got[("flat", "binary", 1)]
  assert got[("ivfpq", "none", 10)] >= 0.95 and got[("hnsw", "none", 4)] >= 0.95
  assert vs.index_nbytes(vs.build_faiss(emb, vs.FaissSettings(quantize="int8"))) < 0.3 * emb.nbytes
  with pytest.raises(GritJaxError, match="--quantize int8 applies to --faiss flat"):
    vs.FaissSettings(kind="hnsw", quantize="int8").check(64)


def test_device_topk_one_vs_eight_devices_equals_numpy():
  rng = np.random.default_rng(0)
  emb, q = rng.standard_normal((1003, 32)).astype(np.float32), rng.standard_normal((5, 32)).astype(np.float32)
  s = q @ emb.T
  top = np.argsort(-s, axis=1)[:, :7]
  assert len(jax.local_devices()) == 8
  for devices, block in ((jax.local_devices()[:1], 64), (jax.local_devices(), 16), (jax.local_devices(), 4096)):
    rows, scores = vs.device_topk(vs.device_corpus(emb, devices, block), q, 7)
    np.testing.assert_array_equal(rows, top)
    np.testing.assert_allclose(scores, np.take_along_axis(s, top, 1), rtol=1e-5, atol=1e-5)


def test_cli_search_and_rag_over_the_index(model, model_dir, corpus, tmp_path, capsys):
  from grit_jax import cli
  from grit_jax.inference import rag as rag_lib
  out = str(tmp_path / "cli_index")
  assert cli.main(["index", "--model", model_dir, "--corpus", *corpus[0], "--out", out, "--shard-rows", "10",
                   "--quantize", "int8", "--no-progress"]) == 0
  assert "29 documents" in capsys.readouterr().out
  assert cli.main(["index", "--model", model_dir, "--corpus", *corpus[0], "--out", out, "--faiss", "hnsw",
                   "--quantize", "int8"]) == 2  # before the model loads
  assert capsys.readouterr().err.strip().endswith("--quantize int8 applies to --faiss flat (hnsw compresses or graphs "
                                                  "the vectors itself)")
  assert cli.main(["search", "--index", out, "--query", "river paris", "-k", "3", "--json", "--instruction", ""]) == 0
  line = json.loads(capsys.readouterr().out)
  assert [h["id"] for h in line["hits"]] == [h["id"] for h in model.search("river paris", out, 3, instruction="")]
  # rag over the corpus index with doc caches on disk: the answer of rag over the same documents in memory
  docs = corpus[2]
  expect = rag_lib.rag(model, "winter ocean", docs, cache="doc", max_new_tokens=4)
  idx = ci.CorpusIndex.load(out)
  cache_dir = str(tmp_path / "kv")
  got = rag_lib.rag(model, "winter ocean", idx, cache="doc", max_new_tokens=4, doc_cache_dir=cache_dir)
  assert (got.doc_index, got.answer) == (expect.doc_index, expect.answer)
  saved = [os.path.join(r, f) for r, _, fs in os.walk(cache_dir) for f in fs]
  assert len(saved) == 1 and model.weights_fingerprint() in saved[0]
  assert cli.main(["rag", "--model", model_dir, "--index", out, "--query", "winter ocean", "--cache", "doc",
                   "--doc-cache", cache_dir, "--max-new-tokens", "4"]) == 0
  printed = capsys.readouterr().out
  assert f"answer: {expect.answer}" in printed and f"retrieved {corpus[1][expect.doc_index]}" in printed
  assert cli.main(["rag", "--model", model_dir, "--index", out, "--corpus", corpus[0][0], "--query", "x"]) == 2
  assert "is a corpus index" in capsys.readouterr().err


def test_mine_takes_the_rank_window_without_positives_or_near_scores(model, model_dir, corpus, built, tmp_path,
                                                                      capsys):
  from grit_jax import cli
  from grit_jax.inference import mine as mine_lib
  docs, emb = corpus[2], np.asarray(built.embeddings)
  queries = [("Find", "river paris"), ("Find", "winter ocean"), ("", "stone garden")]
  order = []
  for instr, q in queries:  # by hand: numpy scores over the index's vectors
    q_D = model.encode([q], instruction=instr)[0]
    order.append((np.argsort(-(emb @ q_D), kind="stable"), emb @ q_D))
  # each row's positive is its query's 2nd-best document: inside the rank window [1, 8), so it must be skipped
  rows = [{"query": list(queries[0]), "pos": [["", docs[order[0][0][1]]]]},
          {"query": list(queries[1]), "pos": [["", docs[order[1][0][1]]]], "neg": [["", "old"]]},
          {"query": queries[2][1], "pos": [docs[order[2][0][1]]]}]
  mined, short = mine_lib.mine(model, rows, built, negatives=3, range_min=1, range_max=8, margin=0.0,
                               margin_type="absolute")
  assert short == 0
  for row, m, (o, s_N) in zip(rows, mined, order):
    assert [n[1] if isinstance(n, list) else n for n in m["neg"]] == [docs[r] for r in o[2:5]]
    assert all(isinstance(n, list) == isinstance(row["pos"][0], list) for n in m["neg"])
  # a relative margin that keeps only candidates scoring <= 1 - m of the positive's: (by hand) the first row's
  m = 1 - (order[0][1][order[0][0][3]] + order[0][1][order[0][0][4]]) / 2 / order[0][1][order[0][0][1]]
  part, short = mine_lib.mine(model, rows[:1], built, negatives=3, range_min=1, range_max=8, margin=float(m))
  assert part[0]["neg"] == [["", docs[r]] for r in order[0][0][4:7]] and short == 0
  # a positive written bare that the corpus holds with its title ("T " + text) is still the positive, not a negative
  q_D = model.encode([texts(17, 0)[2]])[0]
  ranked = [r for r in np.argsort(-(emb @ q_D), kind="stable") if r != 2][:3]
  bare, _ = mine_lib.mine(model, [{"query": texts(17, 0)[2], "pos": [texts(17, 0)[2]]}], built, negatives=3,
                          range_max=8, margin=-10.0, margin_type="absolute")
  assert docs[2] == "T " + texts(17, 0)[2] and bare[0]["neg"] == [docs[r] for r in ranked]
  none, short = mine_lib.mine(model, rows, built, negatives=3, range_max=8, margin=10.0, margin_type="absolute")
  assert short == 3 and all(r["neg"] == [] for r in none)
  data, out = tmp_path / "train.jsonl", tmp_path / "mined.jsonl"
  # written with a BOM (as Windows editors do), the second row scored by a teacher: its scores go with its old negatives
  scored = [dict(r, pos_scores=[0.9], neg_scores=[0.1]) if "neg" in r else r for r in rows]
  data.write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in scored), encoding="utf-8")
  argv = ["mine", "--model", model_dir, "--data", str(data), "--corpus", *corpus[0], "--index", built.path,
          "--out", str(out), "--negatives", "3", "--range-min", "1", "--range-max", "8", "--margin", "0",
          "--margin-type", "absolute", "--shard-rows", "5", "--no-progress"]
  assert cli.main(argv) == 0
  assert [json.loads(line) for line in out.read_text().splitlines()] == mined
  assert "teacher scores dropped from 1 rows" in capsys.readouterr().out
  assert cli.main(argv[:-13] + ["--negatives", "3", "--range-max", "8", "--margin", "10", "--margin-type", "absolute",
                                "--shard-rows", "5", "--no-progress"]) == 0
  assert "3 got fewer than 3 negatives (3 none: training skips such a row" in capsys.readouterr().out
  with open(data, "ab") as f:
    f.write(b'{"query": "caf\xe9", "pos": ["x"]}\n')  # Latin-1, not UTF-8: named by line before any model work
  assert cli.main(argv) == 2
  assert f"{data}:4: not valid UTF-8" in capsys.readouterr().err


def test_served_search_over_a_corpus_index(model, built):
  """`grit-jax serve --index` on a corpus index: /v1/search returns GritLM.search's hits with their text."""
  import httpx

  from grit_jax.inference import serve, serve_worker
  searcher = serve_worker.corpus_index_searcher(model, ci.CorpusIndex.load(built.path))
  worker = serve_worker.Worker(model, searcher=searcher)
  with serve.Server(serve.build_app(model, worker, model_name="tiny")) as s:
    r = httpx.post(s.url + "/v1/search", json={"model": "tiny", "query": ["river paris", "winter ocean"], "k": 3},
                   timeout=120)
  want = model.search(["river paris", "winter ocean"], built.path, 3, return_text=True)
  got = [row["results"] for row in r.json()["data"]]
  assert [[h["id"] for h in q] for q in got] == [[h["id"] for h in q] for q in want]
  assert [[h["text"] for h in q] for q in got] == [[h["text"] for h in q] for q in want]
  np.testing.assert_allclose([[h["score"] for h in q] for q in got], [[h["score"] for h in q] for q in want],
                             rtol=1e-6)
