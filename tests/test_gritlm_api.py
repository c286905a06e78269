"""The GritLM API: parity with the gritlm package (1.0.2) on the same tiny weights, gritlm's argument forms
(wrapped instructions, chat messages, encode_queries / encode_corpus, constructor keywords), the settings a model
carries (grit_settings.json through export and convert), and the inference CLI's early, named errors."""
import dataclasses
import io
import json
import logging
import os
import shutil

import numpy as np
import pytest

from grit_jax.errors import GritJaxError

import helpers_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer.model")
TEXTS = ["The capital of France is Paris.", "short one", "a somewhat longer sentence about mountains and rivers"]


def gritlm_instruction(instruction):  # as in gritlm's README
  return "<|user|>\n" + instruction + "\n<|embed|>\n" if instruction else "<|embed|>\n"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A random tiny HF Mistral with grit_jax's tokenizer, and tokenizer files AutoTokenizer reads the same way."""
  from grit_jax.data.tokenizer import Tokenizer
  d = tmp_path_factory.mktemp("tiny_hf")
  helpers_hf.make_hf_model("mistral", d, vocab_size=Tokenizer(TOKENIZER).vocab_size)
  shutil.copyfile(TOKENIZER, d / "tokenizer.model")
  helpers_hf.save_matching_tokenizer(TOKENIZER, d)
  return str(d)


@pytest.fixture(scope="module")
def ours(hf_dir):
  from grit_jax import GritLM
  return GritLM(hf_dir)


def theirs(hf_dir, **kw):
  import gritlm  # test-only dependency (requirements-test.txt)
  import torch
  return gritlm.GritLM(hf_dir, torch_dtype=torch.float32, device="cpu", **kw)


# ---------------------------------------------------------------------------------------------------------------
# parity with the gritlm package


def test_tokenizer_files_tokenize_like_grit_jax(hf_dir, ours):
  import transformers
  hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
  for s in [gritlm_instruction("Find it") + TEXTS[0], gritlm_instruction("") + TEXTS[2], "a</s>b"]:
    assert hf(s)["input_ids"] == ours.grit_tokenizer.encode("<s>" + s)


@pytest.mark.parametrize("attn,pooling", [("bbcc", "mean"), ("cccc", "mean"), ("bbcc", "weightedmean"),
                                          ("bbcc", "lasttoken"), ("bbcc", "cls")])
def test_embeddings_equal_gritlm_package(hf_dir, attn, pooling):
  from grit_jax import GritLM
  ref = theirs(hf_dir, attn=attn, pooling_method=pooling)
  model = GritLM(hf_dir, attn=attn, pooling_method=pooling)
  for instr in ("", "Retrieve a passage that answers the question"):
    want = ref.encode(TEXTS, instruction=gritlm_instruction(instr), batch_size=2)  # gritlm pads its batches
    got_plain = model.encode(TEXTS, instruction=instr)
    got_wrapped = model.encode(TEXTS, instruction=gritlm_instruction(instr))
    np.testing.assert_allclose(got_plain, want, atol=1e-5)
    np.testing.assert_array_equal(got_wrapped, got_plain)  # recognised, not wrapped twice
  assert np.abs(got_plain - model.encode(TEXTS, instruction="Other task")).max() > 1e-4  # instructions matter


def test_encode_queries_corpus_and_single_string_equal_gritlm_package(hf_dir, ours):
  ref = theirs(hf_dir)
  corpus = [{"title": "Paris", "text": TEXTS[0]}, {"text": TEXTS[1]}, {"title": "", "text": TEXTS[2]}]
  q = gritlm_instruction("Find the passage")
  np.testing.assert_allclose(ours.encode_corpus(corpus, instruction=q), ref.encode_corpus(corpus, instruction=q),
                             atol=1e-5)
  np.testing.assert_allclose(ours.encode_queries(TEXTS, instruction=q), ref.encode_queries(TEXTS, instruction=q),
                             atol=1e-5)
  one, one_ref = ours.encode(TEXTS[0], instruction=q), ref.encode(TEXTS[0], instruction=q)
  assert one.shape == one_ref.shape == (ours.config.hidden_size,)
  np.testing.assert_allclose(one, one_ref, atol=1e-5)
  unnorm = theirs(hf_dir, normalized=False).encode(TEXTS, instruction=q, embed_instruction=True)
  np.testing.assert_allclose(ours.encode(TEXTS, instruction=q, normalize=False, embed_instruction=True), unnorm,
                             atol=1e-5)
  from grit_jax import GritLM
  np.testing.assert_allclose(GritLM(hf_dir, embed_eos="</s>").encode(TEXTS, instruction=q),
                             theirs(hf_dir, embed_eos="</s>").encode(TEXTS, instruction=q), atol=1e-5)


def test_generate_equals_gritlm_package_greedy(hf_dir, ours):
  import torch
  ref = theirs(hf_dir)
  messages = [{"role": "user", "content": "Why is the sky blue?"}]
  ids = ref.tokenizer("<|user|>\nWhy is the sky blue?\n<|assistant|>\n", return_tensors="pt")["input_ids"]
  assert ids[0].tolist() == ours.grit_tokenizer.encode("<s><|user|>\nWhy is the sky blue?\n<|assistant|>\n")
  with torch.no_grad():
    out = ref.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
  eos = ours.config.eos_token_id
  want = ours.grit_tokenizer.decode(out[:out.index(eos)] if eos in out else out)
  assert ours.generate(messages, max_new_tokens=8) == [want]
  assert ours.generate("Why is the sky blue?", max_new_tokens=8, do_sample=False) == [want]


def test_gritlm_readme_generation_flow_gives_the_same_ids_and_text(hf_dir, ours):
  """gritlm's README: encoded = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
  return_tensors="pt"); encoded = encoded.to(model.device); gen = model.generate(encoded, max_new_tokens=...,
  do_sample=False); model.tokenizer.batch_decode(gen). The same lines on grit_jax give the package's ids and text
  (transformers 5 returns a BatchEncoding there, which the package's generate cannot take: it gets input_ids)."""
  import torch
  import transformers
  ref = theirs(hf_dir)
  messages = [{"role": "user", "content": "Why is the sky blue?"}]
  encoded = ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
  encoded = encoded.to(ours.device)
  assert isinstance(ours.tokenizer, transformers.PreTrainedTokenizerFast)
  assert encoded["input_ids"].tolist() == [ref.tokenizer("<|user|>\nWhy is the sky blue?\n<|assistant|>\n")["input_ids"]]
  with torch.no_grad():
    want = ref.generate(encoded["input_ids"], max_new_tokens=8, do_sample=False)
  got = ours.generate(encoded, max_new_tokens=8, do_sample=False)
  np.testing.assert_array_equal(got, want.numpy())
  assert ours.tokenizer.batch_decode(got) == ref.tokenizer.batch_decode(want)
  np.testing.assert_array_equal(ours.generate(encoded["input_ids"].tolist(), max_new_tokens=8), got)  # lists too
  with pytest.raises(GritJaxError, match="integer"):
    ours.generate(np.zeros([1, 3], np.float32))
  with pytest.raises(GritJaxError, match="token id 99999 in row 0 is outside the vocabulary"):
    ours.generate([[1, 99999]], max_new_tokens=2)


def test_transformers_tokenizer_calls_and_left_padded_generate(hf_dir, ours, tmp_path, monkeypatch):
  """model.tokenizer is callable and batches as transformers does, with grit_jax's ids; a left-padded batch from
  apply_chat_template(padding=True, return_dict=True) generates (input_ids=, attention_mask=, pad_token_id=) the
  rows that each prompt generates alone; GritLM(config, params, model.tokenizer) takes it back."""
  from grit_jax import GritLM
  monkeypatch.setenv("GRIT_JAX_CACHE", str(tmp_path))
  before = sorted(os.listdir(hf_dir))
  # converted from tokenizer.model into this test's cache, not into the model folder
  tok = GritLM(ours.config, ours.params, ours.grit_tokenizer).tokenizer
  assert sorted(os.listdir(hf_dir)) == before and len(os.listdir(tmp_path / "tokenizers")) == 1
  batch = tok(TEXTS, padding=True, return_tensors="np")
  assert batch["input_ids"].shape == (3, max(len(ours.grit_tokenizer.encode("<s>" + t)) for t in TEXTS))
  for row, mask, text in zip(batch["input_ids"], batch["attention_mask"], TEXTS):
    assert row[mask == 1].tolist() == ours.grit_tokenizer.encode("<s>" + text)
  # 22, 17 and 32 tokens: one length bucket, the README test's (programs shared)
  chats = [[{"role": "user", "content": "Why is the sky blue?"}], [{"role": "user", "content": "Name a river."}],
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Why?"}]]
  tok.padding_side = "left"
  enc = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_dict=True, return_tensors="pt")
  mask = enc["attention_mask"].numpy()
  assert mask[:, 0].tolist() == [0, 0, 1] and mask[:, -1].tolist() == [1, 1, 1]  # left padded
  pad, n = 7, 8  # not the tokenizer's pad id: finished rows are filled with pad_token_id
  got = ours.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n,
                      do_sample=False, pad_token_id=pad)
  T = mask.shape[1]
  np.testing.assert_array_equal(got[:, :T], enc["input_ids"].numpy())  # the rows as given, then the new ids
  for b, chat in enumerate(chats):
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="np")["input_ids"]
    assert ids[0].tolist() == enc["input_ids"][b][mask[b] == 1].tolist()
    alone = ours.generate(ids, max_new_tokens=n)[0, ids.shape[1]:].tolist()  # one by one, unpadded
    assert got[b, T:].tolist() == alone + [pad] * (got.shape[1] - T - len(alone)), b
  assert tok.batch_decode(got[:, T:], skip_special_tokens=True) == ours.generate(chats, max_new_tokens=n)
  # a model whose EOS is row 1's first new token: row 1 ends there and is filled with pad_token_id
  stop = GritLM(dataclasses.replace(ours.config, eos_token_id=int(got[1, T])), ours.params, tok)
  assert stop.tokenizer is tok and stop.grit_tokenizer is tok._grit_jax_tokenizer  # model.tokenizer taken back
  early = stop.generate(**enc, max_new_tokens=n, pad_token_id=pad)  # a BatchEncoding, as transformers takes it
  assert early[1, T:].tolist() == [got[1, T]] + [pad] * (early.shape[1] - T - 1)
  np.testing.assert_array_equal(ours.generate(**enc, max_new_tokens=n, pad_token_id=pad), got)


def test_tokenizer_json_larger_than_the_vocabulary_is_named(hf_dir, ours, tmp_path, monkeypatch):
  """A model folder whose tokenizer.json has pieces past the weights' vocab_size, and a transformers tokenizer
  with them passed to GritLM(config, params, tokenizer): one error naming it (from_pretrained: before the
  weights)."""
  from tokenizers import Tokenizer as HFTokenizer

  from grit_jax import GritLM
  from grit_jax.convert import load as load_lib
  monkeypatch.setenv("GRIT_JAX_CACHE", str(tmp_path / "cache"))
  d = tmp_path / "bigger"
  shutil.copytree(hf_dir, d, ignore=shutil.ignore_patterns("tokenizer.model"))
  spec = HFTokenizer.from_file(str(d / "tokenizer.json"))
  spec.add_tokens([f"<extra_{i}>" for i in range(3)])
  spec.save(str(d / "tokenizer.json"))
  V = ours.config.vocab_size
  monkeypatch.setattr(load_lib, "load_pretrained", lambda *a, **k: pytest.fail("weights read before the check"))
  with pytest.raises(GritJaxError, match=rf"tokenizer {d}/tokenizer.json: the tokenizer has {V + 3} pieces but "
                                         rf"the model's vocab_size is {V}"):
    GritLM.from_pretrained(str(d))
  import transformers
  fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
  with pytest.raises(GritJaxError, match=rf"tokenizer {d}: the tokenizer has {V + 3} pieces"):
    GritLM(ours.config, ours.params, fast)


# ---------------------------------------------------------------------------------------------------------------
# gritlm's argument forms, without the package


def test_argument_forms_and_their_errors(hf_dir, ours):
  from grit_jax import GritLM
  with pytest.raises(GritJaxError, match="not gritlm's wrapped form"):
    ours.encode(TEXTS[0], instruction="<|user|>\nhalf wrapped")
  with pytest.raises(GritJaxError, match="batch_size=32"):
    ours.encode(TEXTS, 32)
  with pytest.raises(GritJaxError, match="projection"):
    GritLM(hf_dir, projection=8)
  with pytest.raises(GritJaxError, match="mode='embedding'"):
    GritLM(hf_dir, mode="embedding").generate("Hi", max_new_tokens=2)
  with pytest.raises(GritJaxError, match="pooling"):
    GritLM(hf_dir, pooling_method="max")
  with pytest.raises(GritJaxError, match="role"):
    ours.generate([{"role": "system", "content": "x"}], max_new_tokens=2)
  with pytest.raises(GritJaxError, match="unknown keyword"):
    GritLM(hf_dir, trust_remote_code_typo=True)
  assert GritLM(hf_dir, torch_dtype="torch.bfloat16").config.dtype == "bfloat16"
  chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Why?"}]
  assert ours.generate([chat, "Why?"], max_new_tokens=4) == ours.generate([["Hi", "Hello!", "Why?"], "Why?"],
                                                                          max_new_tokens=4)
  none = GritLM(hf_dir, attn=None)  # gritlm's attn=None: the model stays causal
  np.testing.assert_allclose(none.encode(TEXTS), ours.encode(TEXTS, attn="cccc"), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# a trained model carries its settings (grit_settings.json) through export and convert


def test_settings_round_trip_through_export_and_convert(tmp_path, monkeypatch, caplog):
  import jax
  from grit_jax import GritLM, cli
  from grit_jax.data import templates
  from grit_jax.modeling import init_params
  from grit_jax import contract
  from grit_jax.commands import train as train_cli
  from grit_jax.training import export as export_lib

  monkeypatch.chdir(ROOT)
  config, _ = train_cli.parse_args(["--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                                    "--config.attn=cccc", "--config.loss.pooling=weightedmean",
                                    "--config.loss.normalize=False"])
  model_config = contract.model_config(config, log=None)
  params = init_params(model_config, jax.random.PRNGKey(0))
  old = os.umask(0o022)
  try:
    hf = export_lib.export_hf(params, config, model_config, str(tmp_path / "hf"))
  finally:
    os.umask(old)
  assert os.stat(hf).st_mode & 0o777 == 0o755  # the user's umask, not mkdtemp's 0700
  for root, dirs, files in os.walk(hf):  # every file and folder of the export, not only the top
    assert {n: os.stat(os.path.join(root, n)).st_mode & 0o777 for n in files} == {n: 0o644 for n in files}
    assert {n: os.stat(os.path.join(root, n)).st_mode & 0o777 for n in dirs} == {n: 0o755 for n in dirs}
  with open(os.path.join(hf, "grit_settings.json")) as f:
    stored = json.load(f)
  assert (stored["attn"], stored["pooling"], stored["normalize"]) == ("cccc", "weightedmean", False)
  assert (stored["query_max_len"], stored["passage_max_len"]) == (config.data.query_max_len,
                                                                 config.data.passage_max_len)
  train_files = sorted(n for n in os.listdir(config.data.train_dir) if n.endswith(".jsonl"))
  assert [f[0] for f in stored["train_data"]["files"]] == train_files and len(stored["train_data"]["fingerprint"]) == 64

  jx, hf2 = str(tmp_path / "jax"), str(tmp_path / "hf2")
  assert cli.main(["convert", "hf-to-jax", hf, jx]) == 0
  assert cli.main(["convert", "jax-to-hf", jx, hf2]) == 0
  text = "served the way it was trained"
  ids, pool = templates.encode_embedding(GritLM.from_pretrained(hf).grit_tokenizer, "", text, 64)
  for d in (hf, jx, hf2):
    model = GritLM.from_pretrained(d)
    assert (model.attn, model.pooling, model.normalize) == ("cccc", "weightedmean", False)
    h = model.hidden_states(np.asarray([ids]), causal=True)[0]  # causal, weighted mean over the text, no norm
    w = np.asarray(pool) * np.cumsum(pool)
    np.testing.assert_allclose(model.encode(text), (h * w[:, None]).sum(0) / w.sum(), atol=1e-5, rtol=1e-5)
  src = tmp_path / "t.jsonl"
  src.write_text(json.dumps(text) + "\n")
  assert cli.main(["embed", "--model", hf, "--input", str(src), "--output", str(tmp_path / "e.npy")]) == 0
  np.testing.assert_allclose(np.load(tmp_path / "e.npy")[0], model.encode(text), atol=1e-6)  # the CLI too
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    over = GritLM.from_pretrained(hf2, attn="bbcc")
  assert over.attn == "bbcc" and over.pooling == "weightedmean"
  assert [r.getMessage() for r in caplog.records if "overrides" in r.getMessage()] == [
      f"attn='bbcc' overrides the model's trained attn='cccc' ({os.path.join(hf2, 'grit_settings.json')})"]
  assert np.abs(over.encode(text) - model.encode(text)).max() > 1e-4

  with open(os.path.join(hf2, "grit_settings.json"), "w") as f:
    json.dump({**stored, "pooling": "sum"}, f)
  with pytest.raises(GritJaxError, match=r"grit_settings.json: pooling='sum'"):
    GritLM.from_pretrained(hf2)


# ---------------------------------------------------------------------------------------------------------------
# inference CLI: named errors before any work; a RAG index is never silently reused


def test_cli_named_errors_before_work(hf_dir, tmp_path, capsys):
  from grit_jax import cli
  bad = tmp_path / "latin1.jsonl"
  bad.write_bytes(b'"fine"\n"caf\xe9"\n')
  out = tmp_path / "emb.npy"
  assert cli.main(["embed", "--model", hf_dir, "--input", str(bad), "--output", str(out)]) != 0
  assert "latin1.jsonl:2: not UTF-8" in capsys.readouterr().err
  good = tmp_path / "good.jsonl"
  good.write_text('"fine"\n')
  # the output is checked first: the (missing) model is never looked at
  (tmp_path / "dir.npy").mkdir()
  for output, why in ((tmp_path / "dir.npy", "is a directory"), (tmp_path / "no" / "e.npy", "does not exist")):
    assert cli.main(["embed", "--model", str(tmp_path / "nomodel"), "--input", str(good), "--output",
                     str(output)]) != 0
    assert why in capsys.readouterr().err
  assert cli.main(["generate", "--model", hf_dir, "--prompt", "Hi", "--max-new-tokens", "100000"]) != 0
  assert "--max-new-tokens 100000: the model has 256 positions" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["embed", "generate", "rag"])
def test_cli_help_documents_every_option(verb, capsys):
  from grit_jax import cli
  with pytest.raises(SystemExit) as e:
    cli.main([verb, "--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  options = [w.rstrip(",") for w in text.split() if w.startswith("--") and w != "--help"]
  assert len(options) >= 3
  blocks = text.split("\n  --")[1:]
  assert all(len(b.split()) > 2 for b in blocks), text  # every option has a description


def test_rag_index_never_reused_for_another_corpus_or_model(hf_dir, tmp_path, capsys, caplog):
  from grit_jax import cli
  from grit_jax.inference import rag_index
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  a.write_text("".join(json.dumps(t) + "\n" for t in ["Paris is the capital of France.", "Rivers flow."]))
  b.write_text("".join(json.dumps(t) + "\n" for t in ["Mount Everest is high.", "Bread needs yeast."]))
  idx = tmp_path / "idx"
  run = lambda corpus, model=hf_dir: cli.main(["rag", "--model", model, "--query", "capital?", "--index", str(idx),
                                               "--max-new-tokens", "2"] + (["--corpus", str(corpus)] if corpus else []))
  assert run(a) == 0
  assert "retrieved" in capsys.readouterr().out
  with caplog.at_level(logging.WARNING):
    assert run(b) == 0  # a new corpus: rebuilt, answers from it
  assert any("rebuilding" in r.getMessage() for r in caplog.records)
  assert rag_index.RagIndex.load(str(idx)).documents == ["Mount Everest is high.", "Bread needs yeast."]
  retrieved = capsys.readouterr().out.split("retrieved ")[1]
  assert "Everest" in retrieved or "Bread" in retrieved
  other = tmp_path / "other"
  helpers_hf.make_hf_model("mistral", other, seed=1, vocab_size=1000)
  shutil.copyfile(TOKENIZER, other / "tokenizer.model")
  assert run(None, str(other)) != 0  # another model, no corpus to rebuild from: an error
  assert "built with model" in capsys.readouterr().err
  mismatch = "does not match the sha256 in .*index.json \\(edited or damaged\\)"

  def swap_rows(b):  # the two embedding rows exchanged: a valid .npy of the same shape
    emb = np.load(io.BytesIO(b))
    out = io.BytesIO()
    np.save(out, emb[::-1].copy())
    return out.getvalue()

  damage = {  # (file, new bytes or an edit, the message)
      ("embeddings.npy", b"garbage", "embeddings.npy: " + mismatch),
      ("embeddings.npy", swap_rows, "embeddings.npy: " + mismatch),
      ("embeddings.npy", lambda b: b[:-4] + bytes(x ^ 0x55 for x in b[-4:]), "embeddings.npy: " + mismatch),
      ("kv_cache.npz", lambda b: b[:len(b) // 2], "kv_cache.npz: " + mismatch),
      ("documents.jsonl", lambda b: b.replace(b"Everest", b"Kilimanjaro"), "documents.jsonl: " + mismatch),
      ("documents.jsonl", lambda b: b + b"{not json\n", "documents.jsonl: " + mismatch),
      ("index.json", lambda b: b[:-3], "index.json: cannot read index metadata"),
  }
  for i, (name, edit, message) in enumerate(damage):
    copy = tmp_path / f"damaged_{i}"
    shutil.copytree(idx, copy)
    old = (copy / name).read_bytes()
    (copy / name).write_bytes(edit(old) if callable(edit) else edit)
    assert (copy / name).read_bytes() != old
    with pytest.raises(GritJaxError, match=message) as e:
      rag_index.RagIndex.load(str(copy))
    assert "\n" not in str(e.value)
  (idx / "embeddings.npy").write_bytes(b"garbage")
  assert run(None) != 0  # the CLI says so in one line, before loading the model
  assert "embeddings.npy: does not match the sha256" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# one embedding max length, and truncation reported once per call


def test_one_embedding_max_length_everywhere(hf_dir, tmp_path, caplog):
  """GritLM(path) keeps gritlm's 512 (its README gives gritlm's vectors); a model with grit_settings.json embeds at
  its embedding max length (the longer of its trained query / passage lengths) in encode, encode_queries /
  encode_corpus, eval, rag, mteb and the CLI; max_length= / --max-length overrides it. Texts cut to it are reported
  once per call, with their number."""
  from grit_jax import GritLM, cli
  from grit_jax.convert import settings as settings_lib
  from grit_jax.inference import retrieval_eval

  d = tmp_path / "m"
  shutil.copytree(hf_dir, d)
  settings_lib.write(str(d), settings_lib.Settings(query_max_len=12, passage_max_len=16))
  long, short = "mountains and rivers " * 12, "short one"
  assert GritLM(str(d)).max_length() == settings_lib.GRITLM_MAX_LENGTH == 512
  model = GritLM.from_pretrained(str(d))
  assert model.max_length() == 16 and model.max_length(40) == 40
  at16 = model.encode([long, short], max_length=16)
  np.testing.assert_array_equal(model.encode([long, short]), at16)
  np.testing.assert_array_equal(model.encode_queries([long, short]), at16)
  np.testing.assert_array_equal(model.encode_corpus([long, short]), at16)
  np.testing.assert_array_equal(GritLM(str(d)).encode([long, short], max_length=16), at16)
  assert np.abs(GritLM(str(d)).encode([long]) - at16[0]).max() > 1e-4  # gritlm's 512 keeps the text whole

  def reports(fn):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      fn()
    return [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]

  one = reports(lambda: model.encode([long, short, long]))
  assert len(one) == 1 and one[0].startswith("2 of 3 texts (66.7%) truncated to 16 tokens"), one
  queries, corpus = [("Find it", long), ("", short)], [("", long), ("", short), ("", "other " * 30)]
  got = reports(lambda: retrieval_eval.evaluate(model, queries, [[corpus[0]], [corpus[1]]], corpus))
  assert len(got) == 1 and got[0].startswith("3 of 5 texts (60.0%) truncated to 16 tokens"), got
  assert reports(lambda: retrieval_eval.evaluate(model, queries, [[corpus[0]], [corpus[1]]], corpus,
                                                 max_length=200)) == []
  got = reports(lambda: model.rag(long, [long, short], max_new_tokens=1))
  assert len(got) == 1 and got[0].startswith("2 of 3 texts"), got
  src = tmp_path / "t.jsonl"
  src.write_text(json.dumps(long) + "\n" + json.dumps(short) + "\n")
  got = reports(lambda: cli.main(["embed", "--model", str(d), "--input", str(src), "--output",
                                  str(tmp_path / "e.npy")]))
  assert len(got) == 1 and got[0].startswith("1 of 2 texts (50.0%) truncated to 16 tokens"), got
  np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), at16)
  from grit_jax.inference.mteb_adapter import MtebEncoder
  assert MtebEncoder(model).max_length == 16 and MtebEncoder(model, max_length=64).max_length == 64


def test_matryoshka_dims_travel_with_the_model_and_dim_truncates(hf_dir, tmp_path, capsys):
  """grit_settings.json's matryoshka_dims are read back (and kept by save_pretrained); encode(dim=k) and
  `grit-jax embed --dim k` are the first k components of the unnormalised embedding, normalised; bad dims are
  named."""
  from grit_jax import GritLM, cli
  from grit_jax.convert import settings as settings_lib
  d = tmp_path / "m"
  shutil.copytree(hf_dir, d)
  settings_lib.write(str(d), settings_lib.Settings(matryoshka_dims=(16, 32)))
  model = GritLM.from_pretrained(str(d))
  assert model.matryoshka_dims == (16, 32)
  raw = model.encode(TEXTS, normalize=False)
  want = raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True)
  np.testing.assert_allclose(model.encode(TEXTS, dim=16), want, atol=1e-5)
  np.testing.assert_allclose(model.encode(TEXTS, dim=16, normalize=False), raw[:, :16], atol=1e-6)
  src = tmp_path / "t.jsonl"
  src.write_text("".join(json.dumps(t) + "\n" for t in TEXTS))
  assert cli.main(["embed", "--model", str(d), "--input", str(src), "--output", str(tmp_path / "e.npy"),
                   "--dim", "16"]) == 0
  np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want, atol=1e-5)
  with pytest.raises(GritJaxError, match=r"dim=65: expected an integer in \[1, 64\]"):
    model.encode(TEXTS, dim=65)
  capsys.readouterr()
  assert cli.main(["embed", "--model", str(d), "--input", str(src), "--output", str(tmp_path / "f.npy"),
                   "--dim", "65"]) == 2
  assert "--dim 65: larger than the model's hidden size 64" in capsys.readouterr().err
  assert not (tmp_path / "f.npy").exists()
  model.save_pretrained(str(tmp_path / "saved"))
  assert settings_lib.read(str(tmp_path / "saved")).matryoshka_dims == (16, 32)
  from grit_jax.commands import train as train_cli  # a training export records the recipe's dims
  config, _ = train_cli.parse_args(["--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", "w",
                                    "--config.loss.matryoshka_dims=(16,64)"])
  assert settings_lib.from_config(config).to_json()["matryoshka_dims"] == [16, 64]
  for dims, named in (([32, 16], "matryoshka_dims=(32, 16): expected strictly increasing"),
                      ([16, 128], "matryoshka_dims=(16, 128): 128 is larger than the model's hidden size 64")):
    raw_settings = json.loads((d / "grit_settings.json").read_text())
    (d / "grit_settings.json").write_text(json.dumps(dict(raw_settings, matryoshka_dims=dims)))
    with pytest.raises(GritJaxError) as e:
      GritLM.from_pretrained(str(d))
    assert named in str(e.value) and "grit_settings.json" in str(e.value), str(e.value)
