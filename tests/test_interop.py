"""Moving over from gritlm / Hugging Face: the tokenizer without TensorFlow (same ids as seqio's vocabulary, from a
SentencePiece model or a tokenizer.json), inference that imports neither TensorFlow nor seqio, and commands whose
output carries no third-party noise."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from grit_jax.data.tokenizer import Tokenizer
from grit_jax.errors import GritJaxError
from grit_jax.perf import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer.model")
# Special strings, leading / repeated / trailing whitespace, newlines and tabs, digits (split_digits), byte fallback
# (CJK, emoji, combining marks), the GritLM format tokens.
TEXTS = ["hello world", "<s><|embed|>\nhello  world", " leading", "trailing ", "a</s>b<s> c", "<s></s><s>",
         "héllo 日本語 🙂 e\u0301", "x\n\ny\t z", "1234567 3.14", "   z", "a \n b", "<s>", "</s>", "<unk> <pad>",
         "<|user|>\nq\n<|assistant|>\nA.</s>", "ünïcödé — “quotes”", ""]
HEAVY = ("tensorflow", "seqio", "tensorflow_datasets")


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer without seqio


def _seqio_ids(text: str, continuation: bool) -> list[int]:
  """Expected ids from seqio's vocabularies: each segment between <s>/</s>/<unk> through SentencePieceVocabulary
  (with the dummy prefix dropped for a continued segment), <s>/</s>/<unk> as ids 1/2/0 (as HF's tokenizer)."""
  import re

  import seqio
  from sentencepiece import sentencepiece_model_pb2
  plain = seqio.SentencePieceVocabulary(TOKENIZER)
  cont = seqio.SentencePieceVocabulary(
      TOKENIZER, normalizer_spec_overrides=sentencepiece_model_pb2.NormalizerSpec(add_dummy_prefix=False))
  ids, after_text = [], continuation
  for part in re.split(r"(<s>|</s>|<unk>)", text):
    if part in ("<s>", "</s>", "<unk>"):
      ids.append({"<s>": 1, "</s>": 2, "<unk>": 0}[part])
      after_text = False
    elif part:
      ids += list(map(int, (cont if after_text else plain).encode(part)))
      after_text = True
  return ids


def test_tokenizer_ids_equal_seqio_vocabulary():
  tok = Tokenizer(TOKENIZER)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 1000)
  for text in TEXTS:
    for continuation in (False, True):
      assert tok.encode(text, continuation=continuation) == _seqio_ids(text, continuation), (text, continuation)
  ids = tok.encode("<s><|embed|>\n")
  assert ids[0] == 1 and tok.id_to_piece(ids[1]).startswith("▁<")  # the dummy prefix after a special token
  assert tok.decode(tok.encode("<s>héllo 日本語 🙂</s>")) == "héllo 日本語 🙂"


def test_tokenizer_errors_name_the_file(tmp_path):
  with pytest.raises(GritJaxError, match="no SentencePiece model or tokenizer.json"):
    Tokenizer(tmp_path / "missing.model")
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(GritJaxError, match="bad.model.*not a SentencePiece model"):
    Tokenizer(bad)
  bad_json = tmp_path / "tokenizer.json"
  bad_json.write_text("{}")
  with pytest.raises(GritJaxError, match="not a tokenizers JSON file"):
    Tokenizer(bad_json)
  assert Tokenizer.from_dir(str(tmp_path / "nothing_here")) is None


def test_a_folder_whose_tokenizer_files_disagree_is_an_error(tmp_path):
  """grit_jax reads a folder's tokenizer.model, transformers its tokenizer.json: with both there, a stale one would
  tokenize differently without a word. The pair an export writes agrees (its tokenizer.json is converted from the
  model); another tokenizer.json is named."""
  import shutil

  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers.models import WordLevel

  from grit_jax.convert import hf_files
  shutil.copy(TOKENIZER, tmp_path / "tokenizer.model")
  hf_files._converted_sentencepiece(TOKENIZER).save(str(tmp_path / "tokenizer.json"))
  assert Tokenizer(tmp_path).encode("Hello, world!") == Tokenizer(TOKENIZER).encode("Hello, world!")
  HFTokenizer(WordLevel({"[UNK]": 0, "Hello": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(GritJaxError, match=r"tokenizer.model and .*tokenizer.json disagree \(1000 vs 2 tokens"):
    Tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Inference imports neither TensorFlow nor seqio, and no command prints third-party noise


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  from grit_jax.inference.gritlm import GritLM
  from grit_jax.modeling import get_config, init_params
  cfg = get_config("tiny_mistral", dtype="float32")
  d = str(tmp_path_factory.mktemp("model"))
  GritLM(cfg, init_params(cfg, jax.random.PRNGKey(0)), Tokenizer(TOKENIZER)).save_pretrained(d)
  return d


def _user_env():
  """The environment of a user who set nothing: no platform choice, no TF log level, one CPU device."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


_INFERENCE = r"""
import json, sys
from grit_jax import GritLM, cli
d, tmp = sys.argv[1], sys.argv[2]
m = GritLM.from_pretrained(d)
assert m.encode(["one text", "another"]).shape == (2, 64)
m.generate(["Hi"], max_new_tokens=2)
m.rag("a question", ["doc one", "doc two"], max_new_tokens=2)
open(tmp + "/t.jsonl", "w").write('"first"\n"second"\n')
for argv in (["embed", "--model", d, "--input", tmp + "/t.jsonl", "--output", tmp + "/e.npy"],
             ["generate", "--model", d, "--prompt", "Hi", "--max-new-tokens", "2"],
             ["rag", "--model", d, "--corpus", tmp + "/t.jsonl", "--query", "q", "--max-new-tokens", "2"]):
  assert cli.main(argv) == 0, argv
print(json.dumps(sorted(k for k in sys.modules if k.split(".")[0] in %r)))
"""


def test_inference_imports_neither_tensorflow_nor_seqio(model_dir, tmp_path):
  out = subprocess.run([sys.executable, "-c", _INFERENCE % (HEAVY,), model_dir, str(tmp_path)], env=_user_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []
  # The library path (no CLI set-up) picks the CPU itself: no libtpu worker-hostname errors, nothing at all.
  assert out.stderr == "", out.stderr[-3000:]


def test_cli_embed_prints_one_line_and_no_noise(model_dir, tmp_path):
  src = tmp_path / "texts.jsonl"
  src.write_text('"first text"\n{"text": "second"}\n')
  out = subprocess.run([sys.executable, "-m", "grit_jax.cli", "embed", "--model", model_dir, "--input", str(src),
                        "--output", str(tmp_path / "e.npy")], env=_user_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines() == [f"wrote {tmp_path / 'e.npy'}: 2 x 64 float32"]
  assert out.stderr == ""


_TF_IMPORT = r"""
import os, sys
from grit_jax.perf import host
host.quiet_library_logs()
import tensorflow, seqio, tensorflow_datasets
os.write(2, b"I0000 00:00:1.2 77 port.cc:153] oneDNN custom operations are on.\n")
os.write(2, b"W0000 00:00:1.3 77 x.cc:1] a real TF warning\n")
from absl import logging
logging.warning("T5 library uses PAD_ID=%d, which is different", 0)
logging.warning("a real absl warning")
seqio.SentencePieceVocabulary(sys.argv[1]).vocab_size
"""


def test_tensorflow_noise_is_dropped_and_real_warnings_kept():
  out = subprocess.run([sys.executable, "-c", _TF_IMPORT, TOKENIZER], env=_user_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stderr.splitlines()
  # TensorFlow's own start-up lines (oneDNN, CUDA drivers, cuInit, absl::InitializeLog) and seqio's pad-id warning
  # are gone; a line written straight to fd 2 after the import and a real warning still show.
  assert lines == ["I0000 00:00:1.2 77 port.cc:153] oneDNN custom operations are on.",
                   "W0000 00:00:1.3 77 x.cc:1] a real TF warning", "WARNING:absl:a real absl warning"], lines


def test_filtered_stderr_keeps_what_is_not_noise(capfd):
  def run():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"I0000 00:00:1796027264.209694   10990 cudart_stub.cc:31] Could not find cuda drivers\n")
    os.write(2, b"E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n")
    os.write(2, b"E0000 00:00:1.0 1 other.cc:1] a real error\n")
    sys.stderr.write("a Python warning\n")
    return 7
  assert host._filtered_stderr(run) == 7
  # (pytest's capture takes Python's sys.stderr apart from fd 2, so only the set of lines is compared)
  assert sorted(capfd.readouterr().err.splitlines()) == ["E0000 00:00:1.0 1 other.cc:1] a real error",
                                                         "a Python warning"]


# ---------------------------------------------------------------------------------------------------------------
# Exports every tool reads the same way: tokenizer.json / tokenizer_config.json, sentence-transformers modules


def test_export_tokenizer_gives_grit_jax_ids_in_transformers(model_dir):
  import transformers

  from grit_jax.data import templates
  ours = Tokenizer(TOKENIZER)
  theirs = transformers.AutoTokenizer.from_pretrained(model_dir)
  assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.padding_side) == (1, 2, 0, "right")
  for text in TEXTS:
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    assert theirs(text)["input_ids"] == [1] + ours.encode(text), text  # BOS added, no EOS
  # The embedding template as gritlm builds it: BOS from the tokenizer, then the instruction prefix and the text.
  text = "<|user|>\nRetrieve a doc\n<|embed|>\nThe text"
  assert theirs(text)["input_ids"] == ours.encode(templates.embed_text("Retrieve a doc", "The text"))
  # The chat template renders grit_jax's chat prompt and training text.
  chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello! "},
          {"role": "user", "content": "And 2+2?"}]
  prompt = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  assert prompt == templates.chat_prompt([m["content"] for m in chat])
  ids = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
  assert ids == ours.encode(prompt)
  assert theirs.apply_chat_template(chat[:2], tokenize=False) == templates.chat_text(["Hi there", " Hello! "])
  assert theirs.batch_decode([ours.encode("<s>héllo world</s>")], skip_special_tokens=True) == ["héllo world"]


def test_our_tokenizer_answers_gritlms_chat_calls_as_transformers_does(model_dir):
  """gritlm scripts call model.tokenizer.apply_chat_template(...) and .batch_decode(...): GritLM's transformers
  tokenizer (built from the SentencePiece model) answers as transformers on the export does, with grit_jax's ids,
  for every flag combination and a multi-turn chat."""
  import transformers

  from grit_jax.inference import hf_compat
  ours = Tokenizer(TOKENIZER)
  fast = hf_compat.transformers_tokenizer(ours, 256)
  theirs = transformers.AutoTokenizer.from_pretrained(model_dir)
  chats = [[{"role": "user", "content": "Hi there"}],
           [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello! "},
            {"role": "user", "content": "And 2+2?"}],
           [{"role": "user", "content": "naïve\tq"}, {"role": "assistant", "content": "4"}]]
  for chat in chats:
    for gen in (False, True):
      want = theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
      assert fast.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == want
      want_ids = theirs.apply_chat_template(chat, add_generation_prompt=gen, return_dict=True)["input_ids"]
      assert fast.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False) == want_ids
      assert ours.encode(want) == want_ids  # the model's own ids
  rows = [ours.encode("<s><|user|>\nhéllo world\n<|assistant|>\nyes</s>"), ours.encode("<s>two</s>") + [0, 0]]
  for skip in (False, True):
    assert fast.batch_decode(rows, skip_special_tokens=skip) == theirs.batch_decode(rows, skip_special_tokens=skip)


def test_model_with_only_tokenizer_json(model_dir, tmp_path):
  import shutil

  from grit_jax.inference.gritlm import GritLM
  d = tmp_path / "json_only"
  shutil.copytree(model_dir, d)
  os.remove(d / "tokenizer.model")
  json_only, full = GritLM.from_pretrained(str(d)), GritLM.from_pretrained(model_dir)
  assert json_only.grit_tokenizer.kind == "tokenizers" and full.grit_tokenizer.kind == "sentencepiece"
  for text in TEXTS:
    for continuation in (False, True):
      assert json_only.grit_tokenizer.encode(text, continuation) == full.grit_tokenizer.encode(text, continuation), text
  texts = ["a first text", "naïve  spaces\there"]
  np.testing.assert_array_equal(json_only.encode(texts, instruction="Find"), full.encode(texts, instruction="Find"))
  # ... and it exports again (tokenizer.json carried, no tokenizer.model invented)
  out = tmp_path / "again"
  json_only.save_pretrained(str(out))
  assert {"tokenizer.json", "tokenizer_config.json", "modules.json"} <= set(os.listdir(out))
  assert "tokenizer.model" not in os.listdir(out)
  assert Tokenizer(str(out / "tokenizer.json")).encode(TEXTS[1]) == full.grit_tokenizer.encode(TEXTS[1])


def test_sentence_transformers_equals_gritlm_encode(model_dir):
  import sentence_transformers

  from grit_jax.inference.gritlm import GritLM
  model = GritLM.from_pretrained(model_dir)
  st = sentence_transformers.SentenceTransformer(model_dir, device="cpu")
  texts = ["The capital of France is Paris.", "short", "Photosynthesis turns light into sugar, slowly. " * 3]
  instruction = "Given a question, retrieve the passage that answers it"
  got = st.encode(texts, prompt=f"<|user|>\n{instruction}\n<|embed|>\n", convert_to_numpy=True)
  want = model.encode(texts, instruction=instruction)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # No prompt: the model's default prompt, i.e. GritLM.encode without an instruction.
  np.testing.assert_allclose(st.encode(texts, convert_to_numpy=True), model.encode(texts), atol=1e-5)
  # The causal embedding would be far off (the export really runs bidirectionally).
  assert np.abs(model.encode(texts, instruction=instruction, attn="cccc") - want).max() > 1e-2


def test_sentence_transformers_query_and_document_equal_encode_queries_and_corpus(model_dir, tmp_path, caplog,
                                                                                   capfd):
  """encode_query / encode_document of the export == GritLM.encode_queries / encode_corpus: without an instruction
  in the settings (the query prompt is encode_queries' default, none), and with one recorded (the query prompt is
  GritLM's query template of it). Loading prints no transformers load report (no UNEXPECTED lm_head.weight)."""
  import dataclasses
  import logging

  import sentence_transformers

  from grit_jax.inference.gritlm import GritLM
  model = GritLM.from_pretrained(model_dir)
  instruction = "Given a question, retrieve the passage that answers it"
  recorded = GritLM(model.config, model.params, model.grit_tokenizer,
                    settings=dataclasses.replace(model.settings, query_instruction=instruction))
  recorded.save_pretrained(str(tmp_path / "instructed"))
  queries = ["capital of France?", "how do plants make sugar " * 4]
  docs = ["The capital of France is Paris.", "Photosynthesis turns light into sugar, slowly. " * 3]
  for path in (model_dir, str(tmp_path / "instructed")):
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
      st = sentence_transformers.SentenceTransformer(path, device="cpu")
    logged = "\n".join(r.getMessage() for r in caplog.records) + "".join(capfd.readouterr())
    assert "UNEXPECTED" not in logged and "LOAD REPORT" not in logged, logged
    grit = GritLM.from_pretrained(path)
    np.testing.assert_allclose(st.encode_query(queries, convert_to_numpy=True), grit.encode_queries(queries),
                               atol=1e-5)
    np.testing.assert_allclose(st.encode_document(docs, convert_to_numpy=True), grit.encode_corpus(docs), atol=1e-5)
  assert st.prompts["query"] == f"<|user|>\n{instruction}\n<|embed|>\n"
  np.testing.assert_allclose(recorded.encode_queries(queries), model.encode(queries, instruction=instruction))
  assert GritLM.from_pretrained(str(tmp_path / "instructed")).settings.query_instruction == instruction
  # Plain transformers, as the README says: is_causal=False, mean over the text tokens (after BOS + prompt).
  import torch
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, is_causal=False, dtype=torch.float32).model
  n_prompt = len(tok("<|embed|>\n").input_ids)
  with torch.no_grad():
    h = hf(**tok(["<|embed|>\n" + docs[1]], return_tensors="pt")).last_hidden_state[0, n_prompt:].numpy()
  mean = h.mean(0)
  np.testing.assert_allclose(mean / np.linalg.norm(mean), model.encode_corpus(docs[1:])[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# grit-jax eval: retrieval metrics on the user's own rows


def test_retrieval_metrics_hand_worked():
  from grit_jax.inference.retrieval_eval import retrieval_metrics
  scores = np.array([[0.9, 0.8, 0.1, 0.5],    # query 0: ranking 0, 1, 3, 2; relevant {1, 2} at ranks 2 and 4
                     [0.2, 0.1, 0.3, 0.9]])   # query 1: relevant {3} at rank 1
  m = retrieval_metrics(scores, [{1, 2}, {3}])
  ndcg0 = (1 / np.log2(3) + 1 / np.log2(5)) / (1 / np.log2(2) + 1 / np.log2(3))  # = 0.650920
  assert abs(ndcg0 - 0.650920) < 1e-6
  np.testing.assert_allclose([m["ndcg@10"], m["recall@1"], m["recall@5"], m["recall@10"], m["mrr@10"]],
                             [(ndcg0 + 1) / 2, 0.5, 1.0, 1.0, 0.75], atol=1e-9)
  # A relevant passage below rank 10 counts for nothing at 10; tied scores rank in trec_eval's order.
  far = np.concatenate([np.linspace(1, 0.5, 11), [0.0]])[None]  # doc 11 is last (rank 12)
  assert retrieval_metrics(far, [{11}]) == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@1": 0.0, "recall@5": 0.0,
                                            "recall@10": 0.0}
  assert retrieval_metrics(np.zeros((1, 3)), [{1}])["mrr@10"] == 0.5


def _numpy_retrieval_metrics(scores_QD, relevant):
  """grit_jax's metrics before pytrec_eval (numpy; ties in corpus order): the reference for the parity below."""
  order_QD = np.argsort(-scores_QD, axis=1, kind="stable")
  discount = 1.0 / np.log2(np.arange(2, 12))
  totals = {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0}
  for order_D, rel in zip(order_QD, relevant):
    hit_D = np.isin(order_D, list(rel))
    totals["ndcg@10"] += float(discount[hit_D[:10]].sum() / discount[:min(len(rel), 10)].sum())
    first = np.flatnonzero(hit_D[:10])
    totals["mrr@10"] += 1.0 / (first[0] + 1) if first.size else 0.0
    for k in (1, 5, 10):
      totals[f"recall@{k}"] += float(hit_D[:k].sum() / len(rel))
  return {name: value / len(relevant) for name, value in totals.items()}


def test_retrieval_metrics_equal_the_previous_numpy_ones():
  """pytrec_eval gives what the hand-written metrics gave (no ties): 40 queries over 30 documents, 1-4 relevant
  each, some beyond rank 10; and the trainer's top-1 / top-5 (one positive per query) are its recall@1 / @5."""
  from grit_jax.objectives import retrieval_metrics
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(40, 30))
  relevant = [set(rng.choice(30, size=rng.integers(1, 5), replace=False).tolist()) for _ in range(40)]
  ours, want = retrieval_metrics(scores, relevant), _numpy_retrieval_metrics(scores, relevant)
  assert ours.keys() == want.keys() and 0.1 < want["ndcg@10"] < 0.9
  np.testing.assert_allclose([ours[k] for k in want], list(want.values()), atol=1e-9)
  gold = [{i} for i in range(30)]
  m = retrieval_metrics(scores[:30], gold)
  ranked = np.argsort(-scores[:30], axis=1)
  assert m["recall@1"] == np.mean(ranked[:, 0] == np.arange(30))
  assert m["recall@5"] == np.mean((ranked[:, :5] == np.arange(30)[:, None]).any(axis=1))


def test_cli_eval_on_own_rows(model_dir, tmp_path, capsys):
  from grit_jax import cli
  from grit_jax.inference.gritlm import GritLM
  from grit_jax.inference.retrieval_eval import embed_pairs, retrieval_metrics
  rows = [{"query": ["Find the fact", "capital of France"], "pos": ["Paris is the capital of France."],
           "neg": ["Berlin is in Germany."]},
          {"query": "highest mountain", "pos": [["", "Everest is the highest mountain."]],
           "neg": ["Berlin is in Germany.", "Plants make sugar from light."]}]
  data = tmp_path / "rows.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "metrics.json"
  assert cli.main(["eval", "--model", model_dir, "--data", str(data), "--output", str(out)]) == 0
  metrics = json.loads(out.read_text())
  assert metrics["queries"] == 2 and metrics["corpus"] == 4  # the shared negative counted once
  # The same metrics from the embeddings computed here: corpus = distinct passages in first-seen order.
  model = GritLM.from_pretrained(model_dir)
  corpus = [("", "Paris is the capital of France."), ("", "Berlin is in Germany."),
            ("", "Everest is the highest mountain."), ("", "Plants make sugar from light.")]
  q = embed_pairs(model, [("Find the fact", "capital of France"), ("", "highest mountain")], normalize=True)
  want = retrieval_metrics(q @ embed_pairs(model, corpus, normalize=True).T, [{0}, {2}])
  for name, value in want.items():
    assert abs(metrics[name] - value) < 1e-6, name
  assert "ndcg@10" in capsys.readouterr().out
  for flag in ("--packing", "--no-packing"):  # packed rows and padded batches: the same metrics
    assert cli.main(["eval", "--model", model_dir, "--data", str(data), "--output", str(out), flag]) == 0
    assert all(abs(json.loads(out.read_text())[k] - v) < 1e-6 for k, v in want.items()), flag
  # A bad row is named by file and line, before the model is loaded; nothing is written.
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"query": "q", "neg": ["x"]}) + "\n")
  assert cli.main(["eval", "--model", model_dir, "--data", str(bad), "--output", str(tmp_path / "m2.json")]) == 2
  assert f"{bad}:2: missing key 'pos'" in capsys.readouterr().err
  assert not (tmp_path / "m2.json").exists()
  assert cli.main(["eval", "--model", model_dir, "--data", str(tmp_path / "nope")]) == 2
  assert "no such file or folder" in capsys.readouterr().err


def test_demo_reports_what_grit_jax_eval_reports(model_dir, tmp_path):
  """The demo's retrieval numbers (demo.retrieval: retrieval_eval.evaluate at the fine-tuned model's embedding max
  length) are what `grit-jax eval --model DIR --data data/eval` prints: both embed at the lengths the model was
  trained with (here 24 / 32 tokens; the shipped passages are longer, so 512 would rank differently), with the same
  instructions, pooling and candidate set (every distinct held-out passage)."""
  import shutil

  from grit_jax import cli, demo
  from grit_jax.convert import settings as settings_lib
  from grit_jax.inference.gritlm import GritLM
  d = tmp_path / "trained"
  shutil.copytree(model_dir, d)
  settings_lib.write(str(d), settings_lib.Settings(query_max_len=24, passage_max_len=32))
  out = tmp_path / "metrics.json"
  eval_dir = os.path.join(ROOT, "data", "eval")
  assert cli.main(["eval", "--model", str(d), "--data", eval_dir, "--output", str(out)]) == 0
  got = json.loads(out.read_text())
  model = GritLM.from_pretrained(str(d))
  assert model.max_length() == 32
  shown = demo.retrieval([("fine-tuned", model)], eval_dir, model.max_length())["fine-tuned"]
  assert (got["queries"], got["corpus"]) == (shown["queries"], shown["corpus"]) == (25, 48)
  for name in ("recall@1", "recall@5", "ndcg@10", "mrr@10"):
    assert abs(got[name] - shown[name]) < 1e-6, name


# ---------------------------------------------------------------------------------------------------------------
# mteb: results of different models never collide in mteb's cache


def test_mteb_results_are_kept_per_model(model_dir, tmp_path, monkeypatch):
  import shutil
  import socket
  import warnings

  import mteb
  from mteb.cache import ResultCache
  from mteb.mocks.mock_tasks import MockRetrievalTask

  from grit_jax.inference.gritlm import GritLM
  from grit_jax.inference import mteb_adapter
  from grit_jax.inference.mteb_adapter import MtebEncoder
  from grit_jax.modeling import get_config, init_params
  monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  # Two models in folders of the same name, different weights.
  a_dir, b_dir = tmp_path / "a" / "model", tmp_path / "b" / "model"
  shutil.copytree(model_dir, a_dir)
  cfg = get_config("tiny_mistral", dtype="float32")
  GritLM(cfg, init_params(cfg, jax.random.PRNGKey(1)), Tokenizer(TOKENIZER)).save_pretrained(str(b_dir))
  a, b = MtebEncoder.from_pretrained(str(a_dir)), MtebEncoder.from_pretrained(str(b_dir))
  assert a.mteb_model_meta.name == b.mteb_model_meta.name == "grit_jax/model"
  assert a.mteb_model_meta.revision != b.mteb_model_meta.revision
  assert MtebEncoder.from_pretrained(model_dir).mteb_model_meta.revision == a.mteb_model_meta.revision  # a copy

  def score(encoder, cache):
    res = mteb.evaluate(encoder, [MockRetrievalTask()], cache=cache, show_progress_bar=False)
    assert not res.exceptions
    return res.task_results[0].get_score()

  cache = ResultCache(str(tmp_path / "cache"))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got_a, got_b = score(a, cache), score(b, cache)
  assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
  assert (got_a, got_b) == (score(a, None), score(b, None))  # b's own score, not a's from the cache
  assert got_a != got_b, (got_a, got_b)  # (so a shared cache entry would have shown)
  # mteb's loader reloads the model from its directory, with the same revision.
  reloaded = b.mteb_model_meta.load_model()
  assert reloaded.mteb_model_meta.revision == b.mteb_model_meta.revision
  # Settings that change the vectors are part of the identity (mteb's experiment_kwargs): the same weights at
  # another max length are another experiment, scored anew and reloaded with that setting.
  short = MtebEncoder.from_pretrained(str(a_dir), max_length=30)
  assert short.mteb_model_meta.revision == a.mteb_model_meta.revision
  assert short.mteb_model_meta.experiment_name != a.mteb_model_meta.experiment_name
  before = set((tmp_path / "cache").rglob("*.json"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the truncation report
    score(short, cache)
  filed = [p for p in set((tmp_path / "cache").rglob("*.json")) - before if p.name != "model_meta.json"]
  assert filed and all("experiments" in p.parts for p in filed), filed  # its own entry, not a's cached one
  assert short.mteb_model_meta.load_model().max_length == 30
  # A training run's export is named after the run, not `hf`; --name / name= wins.
  run = tmp_path / "runs" / "my-run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  assert mteb_adapter.model_name(str(run / "hf")) == "grit_jax/my-run"
  assert mteb_adapter.model_name(str(a_dir)) == "grit_jax/model"
  assert MtebEncoder.from_pretrained(str(a_dir), "org/mine").mteb_model_meta.name == "org/mine"


# ---------------------------------------------------------------------------------------------------------------
# encode over every local device, with a progress bar on large inputs


def test_encode_splits_batches_over_devices_and_shows_progress(model_dir, capsys):
  from grit_jax.inference.encode import PROGRESS_MIN_TEXTS, encode_tokens, tokenize
  from grit_jax.inference.gritlm import GritLM
  assert jax.local_device_count() == 8  # tests/conftest.py
  model = GritLM.from_pretrained(model_dir)
  texts = [f"text number {i} " + "word " * (i % 7) for i in range(PROGRESS_MIN_TEXTS)]
  tokens = tokenize(model, texts, "", 64)
  one = encode_tokens(model, tokens[:20], batch_size=16, devices=jax.local_devices()[:1])
  capsys.readouterr()
  all_devices = encode_tokens(model, tokens[:20], batch_size=16)
  np.testing.assert_allclose(all_devices, one, atol=1e-5)
  assert "Batches" not in capsys.readouterr().err  # small input: no bar
  sharding = model._placement[3]
  assert len(sharding.device_set) == 8 and sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  many = model.encode(texts, batch_size=128, max_length=64)  # GritLM.encode: every device, a bar for 256 texts
  assert "Batches: 100%" in capsys.readouterr().err and many.shape == (len(texts), 64)
  np.testing.assert_allclose(many[:20], one, atol=1e-5)
  encode_tokens(model, tokens, batch_size=128, show_progress_bar=False)
  assert "Batches" not in capsys.readouterr().err


def test_convert_accepts_a_model_with_only_tokenizer_json(model_dir, tmp_path):
  import shutil

  from grit_jax import cli
  src = tmp_path / "hf_json_only"
  shutil.copytree(model_dir, src)
  os.remove(src / "tokenizer.model")
  assert cli.main(["convert", "hf-to-jax", str(src), str(tmp_path / "jax")]) == 0
  assert cli.main(["convert", "jax-to-hf", str(tmp_path / "jax"), str(tmp_path / "hf")]) == 0
  files = set(os.listdir(tmp_path / "hf"))
  assert {"tokenizer.json", "tokenizer_config.json", "modules.json"} <= files and "tokenizer.model" not in files
  back = Tokenizer(str(tmp_path / "hf" / "tokenizer.json"))
  for text in TEXTS:
    assert back.encode(text) == Tokenizer(TOKENIZER).encode(text), text


def test_mteb_local_task_reports_what_grit_jax_eval_reports(model_dir, tmp_path, monkeypatch):
  """`grit-jax mteb --tasks data/eval/...jsonl`: the user's rows as an MTEB retrieval task, each query with its own
  row's instruction (two in the file), offline; its nDCG@10 / recall@1 equal `grit-jax eval`'s on the same rows."""
  import socket
  import warnings

  import mteb

  from grit_jax.commands.mteb import resolve_tasks
  from grit_jax.inference import retrieval_eval
  from grit_jax.inference.mteb_adapter import MtebEncoder
  monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
  rows = os.path.join(ROOT, "data", "eval", "docs_eval.jsonl")
  (task,) = resolve_tasks([rows])
  assert task.metadata.name == "Local-docs_eval.jsonl"
  enc = MtebEncoder.from_pretrained(model_dir, normalize=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    got = mteb.evaluate(enc, [task], cache=None, show_progress_bar=False).task_results[0].scores["test"][0]
  want = retrieval_eval.evaluate(enc.model, *retrieval_eval.read_rows(rows))
  assert abs(got["ndcg_at_10"] - want["ndcg@10"]) < 1e-4 and abs(got["recall_at_1"] - want["recall@1"]) < 1e-4
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"query": ["q instr", "a"], "pos": [["p instr", "b"]], "neg": []}\n')
  with pytest.raises(GritJaxError, match="bad.jsonl: passages with an instruction"):
    resolve_tasks([str(bad)])
