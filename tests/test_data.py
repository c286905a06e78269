"""Data pipeline: templates and masks (decoded back to text), tfds builds, seqio tasks, batches, resume, sharding,
bad input, packing. Runs on the shipped data/ (tokenizer + JSONL) and small files written into tmp_path."""
import json
import os

import ml_collections
import numpy as np
import pytest

from grit_jax import data as D
from grit_jax.data import batching, iterator, jsonl, sampler, tasks, templates, tfds_builders
from grit_jax.errors import GritJaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_PATH = os.path.join(ROOT, "data", "tokenizer.model")


@pytest.fixture(scope="module")
def tok():
  return D.Tokenizer(TOK_PATH)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_cache"))


def make_cfg(**kw):
  """config.data of configs/base.py (every key, its defaults stated there only) with the tests' sizes."""
  from configs import base

  c = base.get_config().data.to_dict()
  c.update(train_dir=os.path.join(ROOT, "data", "train"), eval_dir=os.path.join(ROOT, "data", "eval"),
           tokenizer=TOK_PATH, mode="unified", query_max_len=32, passage_max_len=64, generative_max_len=48,
           train_group_size=3, embedding_batch_size=8, generative_batch_size=4, pack_generative=False,
           batching="same_dataset", bad_input="skip", seed=0)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def runs(labels):
  """[(start, end)) of the maximal runs of labels != -100."""
  out, start = [], None
  for t, l in enumerate(list(labels) + [-100]):
    if l != -100 and start is None:
      start = t
    elif l == -100 and start is not None:
      out.append((start, t))
      start = None
  return out


def write_jsonl(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


# --- tokenizer and templates -------------------------------------------------------------------------------------

def test_tokenizer_specials_and_ids(tok):
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  assert tok.vocab_size == 1000
  a, b = tok.encode("a b"), tok.encode("c")
  # Literal <s>/</s> become BOS/EOS; the text after a special token starts a new segment (dummy "▁" prefix).
  assert tok.encode("a b<s>c</s>") == a + [1] + b + [2]
  assert tok.encode("<s><|embed|>\n") == [1] + tok.encode("<|embed|>\n")
  assert tok.encode("<s><|embed|>\n")[-1] == tok.piece_to_id("<0x0A>")
  # Markers are plain text: several pieces each, none of them special.
  assert len(tok.encode("<|embed|>")) > 1 and 1 not in tok.encode("<|embed|>")
  text = "Zürich 😀 naïve  spaces\ttabs"
  assert tok.decode(tok.encode(text)) == text  # byte fallback round-trips anything


def test_embedding_template_and_pool_mask(tok):
  assert templates.embed_text("  Retrieve docs: \n", "hello") == "<s><|user|>\nRetrieve docs\n<|embed|>\nhello"
  assert templates.embed_text("", "hello") == "<s><|embed|>\nhello"
  assert templates.embed_text(" :\t", "hello") == "<s><|embed|>\nhello"
  text = "Return the square root of x."
  for instr in ["Given a summary, retrieve the function:", ""]:
    ids, pool = templates.encode_embedding(tok, instr, text, 64)
    assert ids == tok.encode(templates.embed_text(instr, text))
    n_instr = len(tok.encode(templates.embed_prefix(instr)))  # the reference's instruction length
    assert pool == [0] * n_instr + [1] * (len(ids) - n_instr)
    pooled = [i for i, m in zip(ids, pool) if m]
    assert tok.decode(pooled) == text  # pooled span is exactly the text
    assert ids[0] == 1 and pool[0] == 0  # BOS never pooled
  # Only the instruction changes -> the pooled tokens are the same.
  a = templates.encode_embedding(tok, "Instruction one", text, 64)
  b = templates.encode_embedding(tok, "A much longer second instruction", text, 64)
  assert [i for i, m in zip(*a) if m] == [i for i, m in zip(*b) if m]
  # Truncation keeps max_len tokens; an instruction that fills max_len is rejected.
  ids, pool = templates.encode_embedding(tok, "Find it", text * 20, 30)
  assert len(ids) == len(pool) == 30 and sum(pool) == 30 - len(tok.encode(templates.embed_prefix("Find it")))
  with pytest.raises(GritJaxError, match="instruction too long"):
    templates.encode_embedding(tok, "word " * 40, text, 30)
  with pytest.raises(GritJaxError, match="empty text"):
    templates.encode_embedding(tok, "x", "", 30)


def test_chat_template_and_labels(tok):
  turns = ["What does json.dumps do?", "  Serialize obj to a JSON str. ", "And json.loads?", "Deserialize s."]
  full = templates.chat_text(turns)
  assert full == ("<s><|user|>\nWhat does json.dumps do?\n<|assistant|>\nSerialize obj to a JSON str.</s>\n"
                  "<|user|>\nAnd json.loads?\n<|assistant|>\nDeserialize s.</s>")
  ids, labels = templates.encode_chat(tok, turns, 512)
  assert ids == tok.encode(full)  # piecewise encoding == encoding the whole string
  spans = runs(labels)
  assert len(spans) == 2
  for (s, e), answer in zip(spans, ["Serialize obj to a JSON str.", "Deserialize s."]):
    assert tok.decode(labels[s:e]) == answer  # labelled span = assistant text ...
    assert labels[e - 1] == 2 and ids[e - 1] == 2  # ... + </s> (trained)
    assert labels[s:e] == ids[s:e]
  # Everything else (BOS, user turns, format tokens, separator) is ignored.
  user_text = tok.decode([i for i, l in zip(ids, labels) if l == -100])
  assert "What does json.dumps do?" in user_text and "And json.loads?" in user_text and "Serialize" not in user_text
  # The first user span matches the reference's separately tokenized piece exactly.
  assert spans[0][0] == len(tok.encode("<s><|user|>\nWhat does json.dumps do?\n<|assistant|>\n"))
  # Changing a response does not move the user spans of earlier turns.
  ids2, labels2 = templates.encode_chat(tok, [turns[0], "Other answer entirely, longer.", *turns[2:]], 512)
  assert labels2[:spans[0][0]] == labels[:spans[0][0]]
  # A trailing user turn is dropped; truncation can cut the final </s>.
  assert templates.encode_chat(tok, turns + ["unanswered"], 512) == (ids, labels)
  ids3, labels3 = templates.encode_chat(tok, turns, len(ids) - 1)
  assert ids3 == ids[:-1] and labels3 == labels[:-1]
  with pytest.raises(GritJaxError, match="first user turn too long"):
    templates.encode_chat(tok, ["word " * 50, "a"], 20)


def test_chat_prompt():
  assert templates.chat_prompt("Hi there") == "<s><|user|>\nHi there\n<|assistant|>\n"
  assert templates.chat_prompt(["Hi", "Hello! ", "Bye"]) == (
      "<s><|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\nBye\n<|assistant|>\n")
  with pytest.raises(GritJaxError):
    templates.chat_prompt(["Hi", "Hello"])


# --- tfds builders and seqio tasks -------------------------------------------------------------------------------

def test_tfds_builder_builds_offline(tmp_path, tok):
  files = jsonl.split_files(os.path.join(ROOT, "data", "train"))
  assert [os.path.basename(f) for f in files["embedding"]] == [
      "docs_algorithms.jsonl", "docs_files.jsonl", "docs_text.jsonl"]
  ds = tfds_builders.build(files["embedding"], "embedding", tokenizer=TOK_PATH, query_max_len=32, passage_max_len=64,
                           generative_max_len=48, group_size=2, bad_input="error", cache_dir=str(tmp_path))
  assert os.path.isdir(os.path.join(str(tmp_path), "grit_jsonl"))
  lines = [[json.loads(l) for l in open(f, encoding="utf-8")] for f in files["embedding"]]
  assert list(ds.counts) == [len(x) for x in lines] and len(ds) == sum(len(x) for x in lines)
  # File order is kept: index offsets[d] + j is line j+1 of file d, with its content.
  for d in range(3):
    for j in (0, len(lines[d]) - 1):
      rec = ds.records([ds.offsets[d] + j])[0]
      src = lines[d][j]
      assert (rec["dataset"], rec["line"]) == (d, j + 1)
      assert [rec["query_instruction"], rec["query"]] == src["query"]
      assert [[i, t] for i, t in zip(rec["pos_instructions"], rec["pos"])] == src["pos"]
      assert [[i, t] for i, t in zip(rec["neg_instructions"], rec["neg"])] == src["neg"]


def test_seqio_tasks_shapes_and_sharding(tok, cache):
  cfg = make_cfg()
  names = tasks.register_tasks(cfg, split="eval", tokenizer=tok, cache_dir=cache)
  ex = next(tasks.task_numpy(names["embedding"]))
  want = {"query_ids": (32,), "query_mask": (32,), "query_pool_mask": (32,), "passage_ids": (3, 64),
          "passage_mask": (3, 64), "passage_pool_mask": (3, 64)}
  for k, shape in want.items():
    assert ex[k].shape == shape and ex[k].dtype == np.int32, k
  # The eval task = the shared featurizer on the same record (first positive, first negative cycled).
  rec = tfds_builders.build(jsonl.split_files(cfg.eval_dir)["embedding"], "embedding", tokenizer=TOK_PATH,
                            query_max_len=32, passage_max_len=64, generative_max_len=48, group_size=3,
                            bad_input="skip", cache_dir=cache).records([0])[0]
  direct = batching.embedding_features(tok, rec, query_max_len=32, passage_max_len=64, group_size=3, rng=None)
  for k in want:
    np.testing.assert_array_equal(ex[k], direct[k])
  pooled = tok.decode(ex["query_ids"] * ex["query_pool_mask"])
  assert len(pooled) > 10 and rec["query"].startswith(pooled)
  n_prefix = len(tok.encode(templates.embed_prefix(rec["query_instruction"])))
  assert ex["query_pool_mask"].sum() == ex["query_mask"].sum() - n_prefix
  gen = list(tasks.task_numpy(names["generative"]))
  assert gen[0]["gen_ids"].shape == gen[0]["gen_labels"].shape == (48,) and gen[0]["gen_labels"].dtype == np.int32
  # seqio.ShardInfo: two shards cover every example exactly once.
  total = tasks.num_examples(names["generative"])
  seen = [(int(e["dataset"]), int(e["line"])) for s in range(2) for e in tasks.task_numpy(names["generative"], s, 2)]
  assert len(seen) == total == len(set(seen)) == len(gen)


def _examples(it) -> dict[str, int]:
  """The valid examples of each kind the iterator samples from (after skips and duplicate counting)."""
  return {k: len(ds) for k, ds in it.datasets.items()}


# --- training iterator -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unified(tok, cache):
  return lambda **kw: D.make_train_iterator(make_cfg(**kw), tokenizer=tok, cache_dir=cache)


def test_batch_contract(unified, tok):
  it = unified()
  b = next(it)
  shapes = {"query_ids": (8, 32), "query_mask": (8, 32), "query_pool_mask": (8, 32), "passage_ids": (24, 64),
            "passage_mask": (24, 64), "passage_pool_mask": (24, 64), "gen_ids": (4, 48), "gen_mask": (4, 48),
            "gen_labels": (4, 48), "pos_key": (8, 2)}
  assert {k: v.shape for k, v in b.items()} == shapes
  assert all(v.dtype == np.int32 for v in b.values())
  # Right padding; pool mask inside the attention mask; labels ignored on padding.
  for m in (b["query_mask"], b["passage_mask"], b["gen_mask"]):
    assert np.all(np.diff(m, axis=1) <= 0) and np.all(m[:, 0] == 1)
  assert np.all(b["query_pool_mask"] <= b["query_mask"]) and np.all(b["gen_labels"][b["gen_mask"] == 0] == -100)
  # Passages: row i*g is query i's positive, rows i*g+1.. its hard negatives (the neighbour's doc).
  by_query = {}
  for f in jsonl.split_files(os.path.join(ROOT, "data", "train"))["embedding"]:
    for line in open(f, encoding="utf-8"):
      r = json.loads(line)
      by_query.setdefault(r["query"][1], []).append(r)
  for i in range(8):
    q = tok.decode(b["query_ids"][i] * b["query_pool_mask"][i])
    cands = [r for key, rs in by_query.items() if key.startswith(q) for r in rs]
    pos = tok.decode(b["passage_ids"][3 * i] * b["passage_pool_mask"][3 * i])
    neg = tok.decode(b["passage_ids"][3 * i + 1] * b["passage_pool_mask"][3 * i + 1])
    assert any(r["pos"][0][1].startswith(pos[:40]) and r["neg"][0][1].startswith(neg[:40]) for r in cands)
  assert "bad input: no lines skipped" == it.report()


def test_single_dataset_batches():
  counts, batch = np.array([10, 14, 7]), 4
  offsets = np.concatenate([[0], np.cumsum(counts)])
  bs = sampler.epoch_batches(counts, offsets, batch, np.random.default_rng(0), True)
  ds_of = np.searchsorted(offsets, bs, side="right") - 1
  pure = sum(len(set(row)) == 1 for row in ds_of)
  assert pure >= 2 + 3 + 1 and len(bs) == 31 // 4  # 6 single-dataset batches + 1 mixed from the leftovers
  assert len(np.unique(bs)) == bs.size


def test_resume_equals_uninterrupted_and_determinism(unified):
  for kw in ({}, {"pack_generative": True, "pack_embedding": True, "embedding_batch_size": 64}):  # crosses an epoch
    ref = unified(**kw)
    base = [next(ref) for _ in range(7)]
    it = unified(**kw)
    for _ in range(3):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = unified(**kw)
    resumed.set_state(state)
    for want in base[3:]:
      got = next(resumed)
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  other = next(unified(seed=1))
  assert not np.array_equal(other["query_ids"], base[0]["query_ids"])
  with pytest.raises(GritJaxError, match="different"):
    unified(seed=1).set_state(state)


def test_two_process_sharding(tmp_path, tok, cache):
  folder = tmp_path / "shard"
  folder.mkdir()
  for name, n in (("a", 10), ("b", 14)):  # 24 queries, global batch 4: one epoch = 6 batches, nothing dropped
    write_jsonl(folder / f"{name}.jsonl", [{"query": ["Find", f"query {name} {i}"], "pos": [f"doc {i}"],
                                            "neg": [f"other {i}"]} for i in range(n)])
  cfg = make_cfg(train_dir=str(folder), mode="embedding", embedding_batch_size=4, train_group_size=2)
  one = D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  two = [D.make_train_iterator(cfg, tokenizer=tok, shard_index=s, num_shards=2, cache_dir=cache) for s in range(2)]
  seen = []
  for _ in range(6):
    full, parts = next(one), [next(t) for t in two]
    for k in full:  # the per-process shares assemble into the single-process global batch
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    for p in parts:
      assert p["query_ids"].shape == (2, 32)
      seen += [tok.decode(q * m) for q, m in zip(p["query_ids"], p["query_pool_mask"])]
  assert sorted(seen) == sorted([f"query a {i}" for i in range(10)] + [f"query b {i}" for i in range(14)])
  # Packed: each process keeps its own units of the same packing (4 units over 2 processes).
  cfg = make_cfg(pack_generative=True, pack_embedding=True, generative_batch_size=4)
  one = D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache, batch_shards=4)
  two = [D.make_train_iterator(cfg, tokenizer=tok, shard_index=s, num_shards=2, cache_dir=cache, batch_shards=4)
         for s in range(2)]
  for _ in range(2):
    full, parts = next(one), [next(t) for t in two]
    for k in full:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k], err_msg=k)


def test_to_global_batch(unified):
  import jax

  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with pytest.raises(GritJaxError, match="not divisible"):
    D.to_global_batch(next(unified()), mesh)  # 4 generative rows over 8 devices
  b = next(unified(generative_batch_size=8))
  g = D.to_global_batch(b, mesh)
  for k, v in b.items():
    assert g[k].shape == v.shape
    np.testing.assert_array_equal(np.asarray(g[k]), v)
  assert g["query_ids"].sharding.spec[0] == ("data", "fsdp")
  assert len(g["passage_ids"].addressable_shards) == 8 and g["passage_ids"].addressable_shards[0].data.shape[0] == 3


def _unpack(b, name, key):
  """{sequence index: tokens of `key`} of a packed pass, read back through the segment ids."""
  seg, vals = b[f"{name}_segment_ids"], b[f"{name}_{key}"]
  return {int(i) - 1: vals[seg == i] for i in np.unique(seg[seg > 0])}


def test_packed_batches_hold_the_padded_examples(unified):
  """Same examples, same order (via the sequence index), whole sequences; fixed shapes; positions restart."""
  kw = dict(generative_batch_size=4, generative_max_len=128, embedding_batch_size=8)
  padded, packed = unified(**kw), unified(pack_embedding=True, pack_generative=True, query_pack_len=64,
                                         passage_pack_len=256, generative_pack_len=256, **kw)
  levels = set()
  for _ in range(4):
    want, got = next(padded), next(packed)
    levels.add(packed.packer.level)
    for name, lay in packed.packer.layouts.items():  # the shape of the level the packer reports
      assert got[f"{name}_ids"].shape == (1, *lay.shapes[packed.packer.level])
    for name, key in (("query", "pool_mask"), ("passage", "pool_mask"), ("gen", "labels")):
      ids, vals = _unpack(got, name, "ids"), _unpack(got, name, key)
      assert sorted(ids) == list(range(want[f"{name}_ids"].shape[0]))  # every sequence, once
      for i, row in enumerate(want[f"{name}_ids"]):
        n = int(want[f"{name}_mask"][i].sum())
        np.testing.assert_array_equal(ids[i], row[:n])
        ref = want[f"{name}_{key}"][i][:n].copy()
        if key == "labels":
          ref[0] = -100  # the first token is never a target
        np.testing.assert_array_equal(vals[i], ref)
      seg, pos = got[f"{name}_segment_ids"], got[f"{name}_positions"]
      for i in ids:
        np.testing.assert_array_equal(pos[seg == i + 1], np.arange(len(ids[i])))
      assert got[f"{name}_ids"].shape[1] < want[f"{name}_ids"].shape[0]  # several sequences per row
  assert packed.packer.num_levels <= make_cfg().pack_levels + 1  # + the fallback: the shapes a run compiles
  assert packed.packer.fallbacks == 0 and "packed passage: 1 units" in packed.packer.report()
  assert sum(packed.packer.level_steps) == 4 and len(levels) > 1  # this data takes more than one level


def test_packing_fallback_keeps_every_example(unified):
  """Rows set too small: the step takes the fallback shape (one sequence per row), nothing lost."""
  it = unified(mode="embedding", pack_embedding=True, passage_pack_rows=1, query_pack_rows=1)
  b = next(it)
  assert it.packer.fallbacks == 1
  assert b["passage_ids"].shape[:2] == (1, 8 * 3) and len(_unpack(b, "passage", "ids")) == 24


# --- bad input -----------------------------------------------------------------------------------------------------

GOOD_EMB = {"query": ["Find the doc", "a query"], "pos": [["", "a doc"]], "neg": [["", "another doc"]]}
BAD_EMB = [
    ("{not json", "malformed JSON"),
    (json.dumps({"query": ["x", "y"], "neg": ["n"]}), "missing key 'pos'"),
    (json.dumps({"query": ["x", "  "], "pos": ["p"], "neg": ["n"]}), "query: empty text"),
    (json.dumps({"query": ["word " * 40, "y"], "pos": ["p"], "neg": ["n"]}), "query: instruction too long"),
]
BAD_GEN = [
    (json.dumps({"text": ["hi", ""]}), r"text\[1\]: empty text"),
    (json.dumps({"text": ["word " * 60, "a"]}), r"text\[0\]: first user turn too long"),
]


@pytest.mark.parametrize("case", range(len(BAD_EMB) + len(BAD_GEN)))
def test_bad_input_error_policy(tmp_path, tok, cache, case):
  emb = case < len(BAD_EMB)
  line, what = (BAD_EMB + BAD_GEN)[case]
  good = GOOD_EMB if emb else {"text": ["q", "a"]}
  write_jsonl(tmp_path / "d.jsonl", [good, good, line, good])
  cfg = make_cfg(train_dir=str(tmp_path), mode="embedding" if emb else "generative", bad_input="error",
                 embedding_batch_size=1, generative_batch_size=1)
  with pytest.raises(GritJaxError, match=f"{tmp_path / 'd.jsonl'}:3: {what}"):
    D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)


def test_bad_input_skip_policy(tmp_path, tok, cache):
  write_jsonl(tmp_path / "emb.jsonl", [GOOD_EMB] + [l for l, _ in BAD_EMB] + [GOOD_EMB])
  with open(tmp_path / "emb.jsonl", "ab") as f:
    f.write(b"\xff\xfe not utf-8\n")
  write_jsonl(tmp_path / "gen.jsonl", [{"text": ["q", "a"]}] + [l for l, _ in BAD_GEN] + ["", {"text": "plain"}])
  cfg = make_cfg(train_dir=str(tmp_path), bad_input="skip", embedding_batch_size=2, generative_batch_size=2)
  it = D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  emb, gen = str(tmp_path / "emb.jsonl"), str(tmp_path / "gen.jsonl")
  assert it.stats.skipped == {emb: 5, gen: 2}
  assert _examples(it) == {"embedding": 2, "generative": 2}
  for i, (_, what) in enumerate(BAD_EMB):
    assert f"{emb}:{i + 2}: " in it.stats.messages[emb][i] and what.split(":")[-1].strip() in it.stats.messages[emb][i]
  assert f"{emb}:7: not valid UTF-8" in it.stats.messages[emb][4]
  report = it.report()
  assert "skipped 7 line(s)" in report and f"{gen}: 2 skipped" in report and f"{gen}:2:" in report
  next(it)
  # The counts survive a reuse of the cached build.
  assert D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache).stats.skipped == {emb: 5, gen: 2}


def test_eval_batches(tok, cache):
  cfg = make_cfg()
  batches = D.make_eval_iterator(cfg, tokenizer=tok, cache_dir=cache)
  n_emb = sum(int(b["query_weight"].sum()) for b in batches)
  n_gen = sum(int(b["gen_weight"].sum()) for b in batches)
  assert n_emb == n_gen == 25 and len(batches) == 7  # ceil(25 / 4) generative batches
  assert all(b["query_ids"].shape == (8, 32) and b["gen_ids"].shape == (4, 48) for b in batches)
  last = batches[-1]
  assert np.all(last["gen_labels"][last["gen_weight"] == 0] == -100)
  shards = [D.make_eval_iterator(cfg, tokenizer=tok, shard_index=s, num_shards=2, cache_dir=cache) for s in range(2)]
  assert len(shards[0]) == len(shards[1])
  assert sum(int(b["query_weight"].sum()) for s in shards for b in s) == 25


def test_skip_counts_are_reported_from_a_cached_build(tmp_path, tok, monkeypatch, caplog):
  write_jsonl(tmp_path / "emb.jsonl", [GOOD_EMB, "{not json", GOOD_EMB, GOOD_EMB])
  cfg = make_cfg(train_dir=str(tmp_path), mode="embedding", embedding_batch_size=2)
  cache = str(tmp_path / "cache")
  D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  want = f"{tmp_path / 'emb.jsonl'}: 1 skipped"
  assert want in caplog.text
  # A later run (a new process: nothing reported yet) served from the cache, which it must not rebuild.
  caplog.clear()
  monkeypatch.setattr(tfds_builders, "_REPORTED", set())
  monkeypatch.setattr(tfds_builders.GritJsonl, "_generate_examples", lambda self: pytest.fail("rebuilt"))
  D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  assert "bad input: skipped 1 line(s)" in caplog.text and want in caplog.text
  assert f"{tmp_path / 'emb.jsonl'}:2: malformed JSON" in caplog.text


def test_duplicate_rows_are_counted_per_file_and_keyed_in_batches(tmp_path, tok, caplog):
  other = {"query": "another question", "pos": ["another answer"], "neg": ["a negative"]}
  write_jsonl(tmp_path / "emb.jsonl", [GOOD_EMB, other, GOOD_EMB, GOOD_EMB])
  path = str(tmp_path / "emb.jsonl")
  cfg = make_cfg(train_dir=str(tmp_path), mode="embedding", embedding_batch_size=4, train_group_size=2)
  it = D.make_train_iterator(cfg, tokenizer=tok, cache_dir=str(tmp_path / "cache"))
  assert it.stats.duplicates == {path: 2} and _examples(it) == {"embedding": 4}  # counted, kept
  assert it.stats.duplicate_messages[path] == [f"{path}:3: the same row as line 1", f"{path}:4: the same row as line 1"]
  assert "duplicate rows: 2 row(s)" in caplog.text and f"{path}: 2 duplicate(s)" in caplog.text
  batch = next(it)
  key = [tuple(k) for k in batch["pos_key"]]
  firsts = [tuple(r) for r in batch["passage_ids"][::2]]
  assert len(key) == 4 and sorted(key.count(k) for k in set(key)) == [1, 3]  # the 3 copies share one key
  assert all((key[i] == key[j]) == (firsts[i] == firsts[j]) for i in range(4) for j in range(4))
  packed = D.make_train_iterator(make_cfg(train_dir=str(tmp_path), mode="embedding", embedding_batch_size=4,
                                          train_group_size=2, pack_embedding=True),
                                 tokenizer=tok, cache_dir=str(tmp_path / "cache"))
  pkey = [tuple(k) for k in next(packed)["pos_key"]]  # packed: the same grouping (hashes of unpadded ids)
  assert len(pkey) == 4 and sorted(pkey.count(k) for k in set(pkey)) == [1, 3]


def test_bom_symlinks_folders_and_lone_surrogates(tmp_path, tok):
  """A UTF-8 byte-order mark keeps line 1; a dangling symlink or a folder named *.jsonl is a one-line error; a lone
  surrogate escape is a bad line (skipped and counted, or the error under bad_input=error)."""
  other = {"query": "another question", "pos": ["another answer"], "neg": ["a negative"]}
  (tmp_path / "emb.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD_EMB) + "\n" + json.dumps(other) + "\n")
                                       .encode())
  cfg = make_cfg(train_dir=str(tmp_path), mode="embedding", embedding_batch_size=2)
  it = D.make_train_iterator(cfg, tokenizer=tok, cache_dir=str(tmp_path / "cache"))
  assert _examples(it) == {"embedding": 2} and it.stats.skipped == {}
  assert jsonl.file_kind(str(tmp_path / "emb.jsonl")) == jsonl.EMBEDDING
  lone = '{"query": "broken \\ud800 half", "pos": ["p"], "neg": ["n"]}'
  pair = '{"query": "an emoji \\ud83d\\ude00 pair", "pos": ["p"], "neg": ["n"]}'  # a valid pair of escapes
  (tmp_path / "sur").mkdir()
  write_jsonl(tmp_path / "sur" / "s.jsonl", [GOOD_EMB, lone, pair])
  sur = make_cfg(train_dir=str(tmp_path / "sur"), mode="embedding", embedding_batch_size=2)
  it = D.make_train_iterator(sur, tokenizer=tok, cache_dir=str(tmp_path / "cache"))
  path = str(tmp_path / "sur" / "s.jsonl")
  assert it.stats.skipped == {path: 1} and "s.jsonl:2: a lone UTF-16 surrogate" in it.stats.messages[path][0]
  with pytest.raises(GritJaxError, match=r"s.jsonl:2: a lone UTF-16 surrogate escape"):
    D.make_train_iterator(make_cfg(train_dir=str(tmp_path / "sur"), mode="embedding", embedding_batch_size=2,
                                   bad_input="error"), tokenizer=tok, cache_dir=str(tmp_path / "cache2"))
  os.symlink(tmp_path / "gone.jsonl", tmp_path / "link.jsonl")
  with pytest.raises(GritJaxError, match=r"link.jsonl: a dangling symbolic link") as e:
    D.make_train_iterator(cfg, tokenizer=tok, cache_dir=str(tmp_path / "cache"))
  assert "\n" not in str(e.value)
  os.remove(tmp_path / "link.jsonl")
  (tmp_path / "dir.jsonl").mkdir()
  with pytest.raises(GritJaxError, match=r"dir.jsonl: a folder named \*.jsonl"):
    D.make_train_iterator(cfg, tokenizer=tok, cache_dir=str(tmp_path / "cache"))


def test_damaged_tfds_cache_names_the_folder_to_delete(tmp_path, tok):
  import glob
  import shutil

  write_jsonl(tmp_path / "emb.jsonl", [GOOD_EMB, {"query": "q2", "pos": ["p2"], "neg": ["n2"]}])
  cfg = make_cfg(train_dir=str(tmp_path), mode="embedding", embedding_batch_size=2)
  cache = str(tmp_path / "cache")
  D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  (version_dir,) = glob.glob(os.path.join(cache, "grit_jsonl", "*", "*"))
  build_dir = os.path.dirname(version_dir)
  for name in ("dataset_info.json", "metadata.json", "grit_jsonl-train.array_record-00000-of-00001"):
    with open(os.path.join(version_dir, name), "rb") as f:
      good = f.read()
    with open(os.path.join(version_dir, name), "wb") as f:
      f.write(good[:len(good) // 2])
    with pytest.raises(GritJaxError, match=rf"tfds build {build_dir} is damaged .*delete that folder") as e:
      next(D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache))
    assert "\n" not in str(e.value), name
    with open(os.path.join(version_dir, name), "wb") as f:
      f.write(good)
  shutil.rmtree(build_dir)  # as the message says: rebuilt
  assert len(next(D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache))["query_ids"]) == 2


def test_entries_that_are_not_jsonl_are_named(tmp_path, caplog):
  write_jsonl(tmp_path / "a.jsonl", [GOOD_EMB])
  write_jsonl(tmp_path / "README.md", ["# my data"])
  write_jsonl(tmp_path / "more.jsonl.gz", ["x"])
  assert jsonl.list_jsonl(str(tmp_path)) == [str(tmp_path / "a.jsonl")]
  assert "ignoring 2 entries that are not *.jsonl: README.md, more.jsonl.gz" in caplog.text
  only = tmp_path / "only_readme"
  only.mkdir()
  write_jsonl(only / "README.md", ["# my data"])
  with pytest.raises(GritJaxError, match=r"has no \*.jsonl files \(it has: README.md\)"):
    jsonl.list_jsonl(str(only))


@pytest.mark.parametrize("first", [True, False])
def test_line_with_both_kinds_of_keys_is_an_error(tmp_path, tok, cache, first):
  both = dict(GOOD_EMB, text=["q", "a"])
  write_jsonl(tmp_path / "d.jsonl", [both, GOOD_EMB, GOOD_EMB] if first else [GOOD_EMB, GOOD_EMB, both])
  cfg = make_cfg(train_dir=str(tmp_path), mode="embedding", embedding_batch_size=1, bad_input="skip")
  line = 1 if first else 3
  with pytest.raises(GritJaxError, match=f'{tmp_path / "d.jsonl"}:{line}: has both "query" .* and "text"'):
    D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)


def test_truncated_flag_is_exact(tok):
  text = "Return the square root of x, rounded down."
  n = len(tok.encode(templates.embed_text("Find it", text)))
  assert not templates.encode_embedding(tok, "Find it", text, n).truncated  # fits exactly
  cut = templates.encode_embedding(tok, "Find it", text, n - 1)
  assert cut.truncated and len(cut[0]) == n - 1
  turns = ["What is x?", "It is y.", "And z?", "It is w."]
  one_turn = templates.encode_chat(tok, turns[:2], 512)
  assert not one_turn.truncated
  m = len(one_turn[0])
  assert not templates.encode_chat(tok, turns[:2], m).truncated
  dropped = templates.encode_chat(tok, turns, m)  # the first turn fills max_len exactly; the second is dropped
  assert dropped.truncated and dropped == one_turn
  assert templates.encode_chat(tok, turns[:2], m - 1).truncated
  k = len(templates.encode_plain(tok, text, 512)[0])
  assert not templates.encode_plain(tok, text, k).truncated and templates.encode_plain(tok, text, k - 1).truncated


def test_truncated_texts_are_counted_per_pass(tmp_path, tok, cache):
  long = "word " * 100  # > 64 tokens
  emb = [{"query": ["Find it", long if i < 2 else f"query {i}"], "pos": [["", long]], "neg": [["", f"neg {i}"]]}
         for i in range(4)]
  gen = [{"text": long if i == 0 else f"short text {i}"} for i in range(4)]
  write_jsonl(tmp_path / "emb.jsonl", emb)
  write_jsonl(tmp_path / "gen.jsonl", gen)
  cfg = make_cfg(train_dir=str(tmp_path), embedding_batch_size=4, generative_batch_size=4, train_group_size=2,
                 batching="mixed")
  it = D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  next(it)  # one epoch of each: every row once
  assert it.truncation_counts() == {"truncated_query": 2, "truncated_passage": 4, "truncated_gen": 1}
  assert it.texts == {"truncated_query": 4, "truncated_passage": 8, "truncated_gen": 4}
  assert iterator.truncation_report(it.truncated, it.texts) == (
      "truncated to the max length: 2 of 4 queries (50.0%), 4 of 8 passages (50.0%), 1 of 4 generative sequences "
      "(25.0%)")
  # Packed: the same counts (a cut sequence is one of max length; the short ones are a few tokens).
  it = D.make_train_iterator(make_cfg(train_dir=str(tmp_path), mode="generative", pack_generative=True,
                                      generative_batch_size=4), tokenizer=tok, cache_dir=cache)
  full = sum(int(np.sum(b["gen_lengths"] == 48)) for b in [next(it), next(it)])
  assert full == 2 and it.truncation_counts()["truncated_gen"] == full and it.texts["truncated_gen"] == 8


def test_cache_is_keyed_by_content(tmp_path, tok, monkeypatch):
  folder = tmp_path / "data"
  folder.mkdir()
  write_jsonl(folder / "a.jsonl", [{"text": "first version"}])
  kw = dict(tokenizer=TOK_PATH, query_max_len=32, passage_max_len=64, generative_max_len=48, group_size=2,
            bad_input="skip")
  files = [str(folder / "a.jsonl")]
  hashed = []
  sha256 = tfds_builders.sha256_file
  monkeypatch.setattr(tfds_builders, "sha256_file", lambda p: hashed.append(os.path.basename(p)) or sha256(p))
  old = tfds_builders.build(files, "generative", cache_dir=str(tmp_path / "cache"), **kw)
  assert tfds_builders.build(files, "generative", cache_dir=str(tmp_path / "cache"), **kw).builder.data_dir == \
      old.builder.data_dir
  assert hashed.count("a.jsonl") == 1  # its digest is remembered while the file is unchanged
  stat = os.stat(folder / "a.jsonl")
  write_jsonl(folder / "a.jsonl", [{"text": "other version"}])  # same size, same mtime: only the bytes differ
  os.utime(folder / "a.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns))
  new = tfds_builders.build(files, "generative", cache_dir=str(tmp_path / "cache"), **kw)
  assert new.records([0])[0]["turns"] == ["other version"] and old.builder.data_dir != new.builder.data_dir
  assert hashed.count("a.jsonl") == 2
  # Every input of the build enters its key: lengths, group size, policy.
  names = {tfds_builders.make_config("generative", files, **dict(kw, **change)).name
           for change in ({}, {"generative_max_len": 49}, {"group_size": 3}, {"bad_input": "error"})}
  assert len(names) == 4
  # The same bytes elsewhere keep the content fingerprint (the resumable data state carries over).
  other = tmp_path / "copy"
  other.mkdir()
  (other / "a.jsonl").write_bytes((folder / "a.jsonl").read_bytes())
  fp = lambda f: tfds_builders.make_config("generative", [str(f)], **kw).content_fingerprint
  assert fp(folder / "a.jsonl") == fp(other / "a.jsonl")


def test_cache_dir_from_config_or_environment(tmp_path, tok, monkeypatch):
  monkeypatch.setenv("GRIT_JAX_CACHE", str(tmp_path / "root"))
  assert tfds_builders.default_cache_dir() == str(tmp_path / "root" / "tfds")
  monkeypatch.delenv("GRIT_JAX_CACHE")
  assert tfds_builders.default_cache_dir() == os.path.expanduser("~/.cache/grit_jax/tfds")
  write_jsonl(tmp_path / "gen.jsonl", [{"text": f"text {i}"} for i in range(2)])
  cfg = make_cfg(train_dir=str(tmp_path), mode="generative", generative_batch_size=2,
                 cache_dir=str(tmp_path / "mine"))
  it = D.make_train_iterator(cfg, tokenizer=tok)
  assert it.datasets["generative"].builder.data_dir.startswith(str(tmp_path / "mine" / "grit_jsonl"))


# --- issue 24: batches by dataset, own-group files, teacher scores --------------------------------------------------

def test_same_dataset_batches_are_drawn_in_proportion_to_size():
  """Each epoch holds floor(n_d / B) batches of dataset d (the reference's CustomRandomSampler), in shuffled order:
  the dataset of a step is drawn with probability n_d / N (here 12, 4 and 8 of 24 rows, batch 4: 3, 1 and 2 of
  the 6 batches); `mixed` batches are one permutation of all rows."""
  counts, batch = np.array([12, 4, 8]), 4
  offsets = np.concatenate([[0], np.cumsum(counts)])
  first = np.zeros(3)
  for seed in range(600):
    bs = sampler.epoch_batches(counts, offsets, batch, np.random.default_rng(seed), True)
    ds_of = np.searchsorted(offsets, bs, side="right") - 1  # [6, 4]
    assert all(len(set(row)) == 1 for row in ds_of)
    np.testing.assert_array_equal(np.bincount(ds_of[:, 0], minlength=3), [3, 1, 2])
    first[ds_of[0, 0]] += 1
  np.testing.assert_allclose(first / first.sum(), counts / counts.sum(), atol=0.05)
  mixed = sampler.epoch_batches(counts, offsets, batch, np.random.default_rng(0), False)
  assert sorted(mixed.ravel()) == list(range(24))
  ds_mixed = np.searchsorted(offsets, mixed, side="right") - 1
  assert any(len(set(row)) > 1 for row in ds_mixed)


def _scored_folder(tmp_path):
  """a.jsonl: 6 rows with teacher scores (pos i + 0.5, negs -i and -i - 0.25); b.jsonl: 10 rows without."""
  write_jsonl(tmp_path / "a.jsonl", [{"query": f"alpha query {i}", "pos": [f"alpha pos {i}"],
                                      "neg": [f"alpha neg {i}", f"alpha neg two {i}"], "pos_scores": [i + 0.5],
                                      "neg_scores": [-i, -i - 0.25]} for i in range(6)])
  write_jsonl(tmp_path / "b.jsonl", [{"query": f"beta query {i}", "pos": [f"beta pos {i}"], "neg": [f"beta neg {i}"]}
                                     for i in range(10)])
  return make_cfg(train_dir=str(tmp_path), mode="embedding", train_group_size=2, embedding_batch_size=2,
                  batching="same_dataset", no_in_batch_negatives=("b.jsonl",))


def test_own_group_files_and_teacher_scores_in_batches(tmp_path, tok, cache):
  cfg = _scored_folder(tmp_path)
  text = lambda ids, pool: tok.decode(ids * pool)
  for pack in (False, True):
    it = D.make_train_iterator(dict_cfg(cfg, pack_embedding=pack), tokenizer=tok, cache_dir=cache)
    seen = set()
    for _ in range(8):  # one epoch: 3 batches of a, 5 of b
      b = next(it)
      queries = [text(*r) for r in zip(b["query_ids"], b["query_pool_mask"])] if not pack else [
          text(_unpack(b, "query", "ids")[i], _unpack(b, "query", "pool_mask")[i]) for i in range(2)]
      files = {q.split()[0] for q in queries}
      assert len(files) == 1  # same_dataset
      seen.add(files.pop())
      np.testing.assert_array_equal(b["no_in_batch_neg"], [int(q.startswith("beta")) for q in queries])
      assert b["teacher_scores"].shape == (2, 2) and b["teacher_scores"].dtype == np.float32
      for q, scores in zip(queries, b["teacher_scores"]):
        if q.startswith("beta"):
          assert np.isnan(scores).all()
        else:
          i = int(q.split()[-1])
          assert scores[0] == i + 0.5 and scores[1] in (-i, -i - 0.25)  # the sampled negative's own score
    assert seen == {"alpha", "beta"}
  # resumed = uninterrupted, the new keys included (NaN == NaN here)
  ref = D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  want = [next(ref) for _ in range(6)]
  it = D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  next(it), next(it)
  resumed = D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  resumed.set_state(json.loads(json.dumps(it.get_state())))
  for w in want[2:]:
    got = next(resumed)
    assert got.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)


def dict_cfg(cfg, **kw):
  return ml_collections.ConfigDict(dict(cfg.to_dict(), **kw))


@pytest.mark.parametrize("rows, policy, named", [
    ([{"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1.0], "neg_scores": [0.5]}], "error",
     "a.jsonl:1: neg_scores: 1 score(s) for 2 neg text(s)"),
    ([{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0]}], "error",
     "a.jsonl:1: neg_scores: missing, but the row has pos_scores"),
    ([{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": ["high"], "neg_scores": [0.5]}], "error",
     "a.jsonl:1: pos_scores: expected a list of finite numbers"),
    ([{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0], "neg_scores": [0.5]},
      {"query": "q2", "pos": ["p2"], "neg": ["n2"]}], "skip",
     "a.jsonl:2: has no pos_scores / neg_scores but line 1 has"),
])
def test_bad_teacher_scores_are_named(tmp_path, tok, cache, rows, policy, named):
  write_jsonl(tmp_path / "a.jsonl", rows * 2 if len(rows) == 1 else rows)
  cfg = make_cfg(train_dir=str(tmp_path), mode="embedding", train_group_size=2, embedding_batch_size=1,
                 bad_input=policy)
  with pytest.raises(GritJaxError) as e:
    D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  assert named in str(e.value), str(e.value)


def test_same_dataset_step_loss_equals_hand_computed(tmp_path, tok, cache):
  """A same_dataset batch (from the iterator) through the step's objective: L_rep with Matryoshka dims, own-group
  rows and distillation equals the loss written out in numpy over that one dataset's rows, from the model's
  pooled representations."""
  import jax
  from grit_jax import sharding as mesh_lib
  from grit_jax.modeling import get_config, init_params
  from grit_jax.training import grit_objective

  cfg = dict_cfg(_scored_folder(tmp_path), embedding_batch_size=4)
  it = D.make_train_iterator(cfg, tokenizer=tok, cache_dir=cache)
  batches = [next(it) for _ in range(4)]  # one epoch: a 1, b 2 full batches + 1 mixed from the leftovers
  model = get_config("tiny_mistral", vocab_size=tok.vocab_size, num_layers=1, dtype="float32")
  params = init_params(model, jax.random.PRNGKey(0))
  loss = ml_collections.ConfigDict(dict(pooling="mean", normalize=True, temperature=0.5, lambda_rep=1.0,
                                        lambda_gen=1.0, lm_loss_mode="mixed", lm_loss_sub_batches=1,
                                        lm_token_factor=1.0, contrastive_grad="exact", matryoshka_dims=(16, 64),
                                        matryoshka_weights=(1.0, 0.5), distill_weight=0.5, distill_temperature=2.0))
  mesh, rules = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=1), devices=jax.devices()[:1])
  obj = grit_objective.GritObjective(model, loss, mesh, rules)
  loss_fn, embed_q, embed_p = (jax.jit(f) for f in (obj.loss, obj.embed_query, obj.embed_passage))
  checked = set()
  for b in batches:
    files = set(b["no_in_batch_neg"])
    if len(files) != 1:
      continue  # the mixed leftover batch
    own = bool(files.pop())
    checked.add(own)
    with jax.set_mesh(mesh):
      _, m = loss_fn(params, b)
      q = np.asarray(embed_q(params, b["query_ids"], b["query_mask"], b["query_pool_mask"]))
      p = np.asarray(embed_p(params, b["passage_ids"], b["passage_mask"], b["passage_pool_mask"]))
    want = 0.0
    for k, w in ((16, 1.0), (64, 0.5)):
      qk = q[:, :k] / np.linalg.norm(q[:, :k], axis=1, keepdims=True)
      pk = p[:, :k] / np.linalg.norm(p[:, :k], axis=1, keepdims=True)
      logits = qk @ pk.T / 0.5  # [4, 8]
      for i in range(4):
        cand = [2 * i, 2 * i + 1] if own else list(range(8))  # b.jsonl: its own group only
        row = logits[i, cand]
        ce = np.log(np.exp(row).sum()) - logits[i, 2 * i]
        kd = 0.0
        if not own:  # a.jsonl has teacher scores
          t = np.exp(b["teacher_scores"][i] / 2.0)
          t /= t.sum()
          s = logits[i, [2 * i, 2 * i + 1]]
          log_s = s - np.log(np.exp(s).sum())
          kd = float(np.sum(t * (np.log(t) - log_s)))
        want += w * (ce + 0.5 * kd) / 4
    np.testing.assert_allclose(float(m["loss_rep"]), want, rtol=1e-5)
  assert checked == {False, True}
