"""A model's own special tokens and chat format (data.templates.TextFormat, read from its tokenizer files): a tiny
SmolLM2-shaped byte-level BPE with a ChatML template (tests/helpers_hf.save_chatml_tokenizer), compared with
transformers on the same files; GritLM's format where no file says otherwise; SmolLM2's real tokenizer when its
GGUF is installed. No model is compiled."""
import json
import os
import shutil

import numpy as np
import pytest

import helpers_hf
from grit_jax.convert import hf_files
from grit_jax.data import templates
from grit_jax.data.tokenizer import Tokenizer
from grit_jax.errors import GritJaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_PATH = os.path.join(ROOT, "data", "tokenizer.model")
TURNS = ["What does json.dumps do?", "  Serialize obj to a JSON str. ", "And json.loads?", "Deserialize s."]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("chatml")
  helpers_hf.save_chatml_tokenizer(d)
  return str(d)


@pytest.fixture(scope="module")
def tok(chatml_dir):
  return Tokenizer(os.path.join(chatml_dir, "tokenizer.json"))


@pytest.fixture(scope="module")
def hf(chatml_dir):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(chatml_dir)


def messages(turns):
  return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def spans(labels):
  """[(start, end)) of the maximal runs of labels != -100."""
  marks = [l != templates.IGNORE for l in [-100] + list(labels) + [-100]]
  edges = [i - 1 for i in range(1, len(marks)) if marks[i] != marks[i - 1]]
  return list(zip(edges[::2], edges[1::2]))


def test_format_comes_from_the_tokenizer_files(tok, chatml_dir):
  fmt = tok.text_format
  assert (fmt.bos_token, fmt.eos_token, fmt.unk_token, fmt.pad_token, fmt.add_bos) == (
      "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>", False)
  assert fmt.chat_template == open(os.path.join(chatml_dir, "chat_template.jinja")).read() and fmt.bos == ""
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
  # A bare SentencePiece model is GritLM's, exactly as before.
  assert Tokenizer(TOK_PATH).text_format == templates.GRIT


def test_embedding_has_no_bos_and_pools_exactly_the_text(tok, hf):
  text = "Paris is the capital of France."
  for instr, prefix in [("Retrieve the answer: ", "<|user|>\nRetrieve the answer\n<|embed|>\n"), ("", "<|embed|>\n")]:
    assert templates.embed_prefix(instr, tok.text_format) == prefix
    ids, pool = templates.encode_embedding(tok, instr, text, 64)
    assert ids == hf(prefix + text, add_special_tokens=False)["input_ids"] == hf(prefix + text)["input_ids"]
    n = len(tok.encode(prefix))
    assert pool == [0] * n + [1] * (len(ids) - n) and ids[0] != tok.bos_id
    assert tok.decode([i for i, m in zip(ids, pool) if m]) == text


@pytest.mark.parametrize("n_turns", [2, 4])
def test_chat_labels_are_the_replies_and_their_end_of_turn(tok, hf, n_turns):
  turns = TURNS[:n_turns]
  full = templates.chat_text(turns, tok.text_format)
  stripped = [t if i % 2 == 0 else t.strip() for i, t in enumerate(turns)]
  assert full == hf.apply_chat_template(messages(stripped), tokenize=False)
  ids, labels = templates.encode_chat(tok, turns, 512)
  assert ids == hf(full, add_special_tokens=False)["input_ids"] == tok.encode(full)
  assert ids == list(hf.apply_chat_template(messages(stripped), tokenize=True, return_dict=False))
  got = spans(labels)
  assert len(got) == n_turns // 2
  for (s, e), reply in zip(got, stripped[1::2]):
    assert labels[s:e] == ids[s:e] and ids[e - 1] == tok.eos_id  # the reply + <|im_end|>, not the "\n" after it
    assert labels[s:e] == hf(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
  assert got[0][0] == len(hf.apply_chat_template(messages(stripped[:1]), add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
  # Truncation cuts labels with the ids; a first turn that fills max_len is refused.
  cut = templates.encode_chat(tok, turns, len(ids) - 3)
  assert tuple(cut) == (ids[:-3], labels[:-3]) and cut.truncated
  with pytest.raises(GritJaxError, match="first user turn too long"):
    templates.encode_chat(tok, ["word " * 50, "a"], 20)


def test_plain_rows_add_eos_and_no_bos(tok):
  ids, labels = templates.encode_plain(tok, "Paris is nice.", 64)
  assert ids == tok.encode("Paris is nice.<|im_end|>") and labels == [-100] + ids[1:]


def test_prompts_and_chat_calls_in_the_model_format(tok, hf):
  fmt = tok.text_format
  prompt = templates.chat_prompt(["Hi", "Hello!", "Bye"], fmt)
  assert prompt == hf.apply_chat_template(messages(["Hi", "Hello!", "Bye"]), tokenize=False,
                                          add_generation_prompt=True)
  # A prompt already rendered is not wrapped twice (either format); gritlm's "<|user|>\n..." gets GritLM's BOS.
  assert templates.chat_prompt(prompt, fmt) == prompt
  assert templates.chat_prompt("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", fmt).count("system") == 0
  grit = templates.chat_prompt("Hi")
  assert templates.chat_prompt(grit) == grit == "<s>" + templates.chat_prompt("<|user|>\nHi\n<|assistant|>\n")[3:]
  assert templates.chat_prompt("<|user|>\nHi\n<|assistant|>\n") == grit
  # GritLM.tokenizer (transformers', from the model's own files) follows the model's template and special tokens.
  from grit_jax.inference import hf_compat
  fast = hf_compat.transformers_tokenizer(tok, 256)
  enc = fast.apply_chat_template(messages(["Hi"]), add_generation_prompt=True, return_tensors="np")["input_ids"]
  want = hf.apply_chat_template(messages(["Hi"]), add_generation_prompt=True, tokenize=True, return_dict=False)
  assert enc.tolist() == [list(want)] == [tok.encode(templates.chat_prompt(["Hi"], fmt))]
  rows = [enc[0].tolist() + tok.encode("Hello!<|im_end|>") + [tok.pad_id] * 2]
  assert fast.batch_decode(rows) == hf.batch_decode(rows)
  assert fast.batch_decode(rows, skip_special_tokens=True) == hf.batch_decode(rows, skip_special_tokens=True)


def test_generate_prompts_in_the_model_format(tok, hf, monkeypatch):
  """GritLM.generate's prompt ids (the decode loop itself is tested on GritLM's format in test_inference)."""
  import jax
  from grit_jax import GritLM
  from grit_jax.inference import generate as gen
  from grit_jax.modeling import get_config, init_params

  cfg = get_config("tiny_mistral", dtype="float32", vocab_size=tok.vocab_size, bos_token_id=1, eos_token_id=2)
  model = GritLM(cfg, init_params(cfg, jax.random.PRNGKey(0)), tok)
  seen = []
  reply = tok.encode("Hello!<|im_end|>")
  monkeypatch.setattr(gen, "generate_ids", lambda m, seqs, *a, **k: seen.extend(seqs) or [reply for _ in seqs])
  rendered = hf.apply_chat_template(messages(["Hi"]), add_generation_prompt=True, tokenize=False)
  assert model.generate(["Hi", rendered, messages(["Hi", "Hello!", "Bye"])], max_new_tokens=4) == ["Hello!"] * 3
  want = hf.apply_chat_template(messages(["Hi"]), add_generation_prompt=True, tokenize=True, return_dict=False)
  assert seen[0] == seen[1] == list(want)  # the rendered prompt is not wrapped twice
  assert seen[2] == list(hf.apply_chat_template(messages(["Hi", "Hello!", "Bye"]), add_generation_prompt=True,
                                                tokenize=True, return_dict=False))


def variant(chatml_dir, out, config: dict, template: str, bos_first: bool = False):
  """The tiny tokenizer with other tokenizer_config.json entries and chat template; bos_first: its post-processor
  adds <|begin_of_text|> (as Llama 3's does)."""
  spec = json.load(open(os.path.join(chatml_dir, "tokenizer.json")))
  if bos_first:
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [3],
                                                                       "tokens": ["<|begin_of_text|>"]}}}
  (out / "tokenizer.json").write_text(json.dumps(spec))
  base = json.load(open(os.path.join(chatml_dir, "tokenizer_config.json")))
  (out / "tokenizer_config.json").write_text(json.dumps(dict(base, chat_template=template, **config)))
  return Tokenizer(out / "tokenizer.json")


LLAMA3ISH = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWENISH = ("{% for m in messages %}{% if loop.first %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
           "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_llama3_and_qwen_shaped_formats(chatml_dir, tmp_path):
  """A tokenizer that adds BOS and a template that renders it (Llama 3): one BOS before embeddings and chats; no BOS
  token at all (Qwen): none, and its first special token marks a rendered prompt."""
  import transformers
  (tmp_path / "l").mkdir()
  (tmp_path / "q").mkdir()
  llama = variant(chatml_dir, tmp_path / "l", {"bos_token": "<|begin_of_text|>"}, LLAMA3ISH, bos_first=True)
  qwen = variant(chatml_dir, tmp_path / "q", {"bos_token": None}, QWENISH)
  for tok, bos, d in ((llama, "<|begin_of_text|>", "l"), (qwen, "", "q")):
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / d))
    assert tok.text_format.bos == bos
    ids, pool = templates.encode_embedding(tok, "", "Paris is nice.", 64)
    assert ids == hf("<|embed|>\nParis is nice.")["input_ids"]  # BOS exactly when the tokenizer adds one
    ids, labels = templates.encode_chat(tok, TURNS, 512)
    stripped = [t if i % 2 == 0 else t.strip() for i, t in enumerate(TURNS)]
    assert ids == list(hf.apply_chat_template(messages(stripped), tokenize=True, return_dict=False))
    assert [labels[s:e] for s, e in spans(labels)] == [tok.encode(r + "<|im_end|>") for r in stripped[1::2]]
    prompt = templates.chat_prompt("Hi", tok.text_format)
    assert templates.chat_prompt(prompt, tok.text_format) == prompt
  assert (qwen.bos_id, llama.bos_id) == (qwen.eos_id, 3)


def test_a_template_without_the_prefix_property_is_refused(chatml_dir, tmp_path):
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copyfile(os.path.join(chatml_dir, name), tmp_path / name)
  (tmp_path / "chat_template.jinja").write_text(  # marks the last message: re-renders a turn once another follows
      "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}{% endfor %}")
  with pytest.raises(GritJaxError, match="tokenizer_config.json: its chat template does not render"):
    Tokenizer(tmp_path / "tokenizer.json")


def test_grit_chat_template_in_the_files_is_grit_format(tmp_path):
  hf_files.write_tokenizer_files(Tokenizer(TOK_PATH), str(tmp_path), 256)
  fmt = Tokenizer(tmp_path / "tokenizer.json").text_format
  assert (fmt.chat_template, fmt.bos, fmt.eos_token) == (None, "<s>", "</s>")


def test_export_keeps_the_models_own_tokenizer_files(tok, chatml_dir, tmp_path):
  written = hf_files.write_tokenizer_files(tok, str(tmp_path), 256)
  assert written == ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
  for name in written:
    assert (tmp_path / name).read_bytes() == open(os.path.join(chatml_dir, name), "rb").read()
  (tmp_path / "config.json").write_text("{}")
  hf_files.write_sentence_transformers_files(str(tmp_path), 8, text_format=tok.text_format)
  st = json.loads((tmp_path / "config_sentence_transformers.json").read_text())
  assert st["prompts"] == {"query": "<|embed|>\n", "document": "<|embed|>\n"}  # no BOS: the model has none
  assert Tokenizer(tmp_path / "tokenizer.json").text_format == tok.text_format


def test_training_data_with_a_chat_template_tokenizer(tok, chatml_dir, tmp_path):
  from grit_jax import data as D
  from grit_jax.data import tasks, tfds_builders
  from test_data import make_cfg, write_jsonl

  train = tmp_path / "train"
  train.mkdir()
  write_jsonl(train / "emb.jsonl", [{"query": ["Find the city", f"capital {i}"], "pos": [["", "Paris is nice."]],
                                     "neg": [["", "The dog jumps."]]} for i in range(8)])
  write_jsonl(train / "gen.jsonl", [{"text": TURNS} for _ in range(4)])
  path = os.path.join(chatml_dir, "tokenizer.json")
  cfg = make_cfg(train_dir=str(train), eval_dir=str(train), tokenizer=path, train_group_size=2,
                 generative_batch_size=2, passage_max_len=32, generative_max_len=64)
  b = next(D.make_train_iterator(cfg, tokenizer=tok, cache_dir=str(tmp_path / "cache")))
  ids, labels = templates.encode_chat(tok, TURNS, 64)
  np.testing.assert_array_equal(b["gen_ids"][0, :len(ids)], ids)
  np.testing.assert_array_equal(b["gen_labels"][0, :len(ids)], labels)
  assert (b["gen_ids"][0, len(ids):] == tok.pad_id).all()
  q, pool = templates.encode_embedding(tok, "Find the city", "capital 0", 32)
  assert b["query_ids"][:, 0].tolist() == [q[0]] * 8 and q[0] != tok.bos_id  # no BOS
  # seqio tasks take the tokenizer.json (a vocabulary that only declares its size).
  names = tasks.register_tasks(cfg, split="eval", tokenizer=tok, cache_dir=str(tmp_path / "cache"))
  ex = next(tasks.task_numpy(names["generative"]))
  np.testing.assert_array_equal(ex["gen_labels"][:len(labels)], labels)
  # The cache key covers the files that set the format.
  key = lambda: tfds_builders.make_config("generative", [str(train / "gen.jsonl")], tokenizer=path, query_max_len=8,
                                          passage_max_len=8, generative_max_len=8, group_size=2,
                                          bad_input="skip").name
  before = key()
  config = os.path.join(chatml_dir, "tokenizer_config.json")
  saved = open(config).read()
  try:
    with open(config, "w") as f:
      json.dump(dict(json.loads(saved), add_bos_token=True), f)
    assert key() != before
  finally:
    with open(config, "w") as f:
      f.write(saved)
  assert key() == before


def test_smollm2_real_tokenizer(tmp_path):
  """SmolLM2-135M-Instruct's tokenizer as transformers builds it from the shipped GGUF (~10 s; `make venv` installs
  the file, and a missing one fails here with the install command, never a skip)."""
  import transformers

  from grit_jax.convert.gguf import smollm2_path
  gguf = smollm2_path()
  hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
  hf.save_pretrained(str(tmp_path))
  tok = Tokenizer(tmp_path / "tokenizer.json")
  assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.text_format.bos) == (49152, 0, 1, 2, "")
  ids, labels = templates.encode_chat(tok, TURNS, 512)
  stripped = [t if i % 2 == 0 else t.strip() for i, t in enumerate(TURNS)]
  assert ids == list(hf.apply_chat_template(messages(stripped), tokenize=True, return_dict=False))
  assert [labels[s:e] for s, e in spans(labels)] == [
      hf(r + "<|im_end|>", add_special_tokens=False)["input_ids"] for r in stripped[1::2]]
  ids, pool = templates.encode_embedding(tok, "Retrieve the answer", "Paris is the capital.", 64)
  assert ids == hf("<|user|>\nRetrieve the answer\n<|embed|>\nParis is the capital.")["input_ids"]
  assert tok.decode([i for i, m in zip(ids, pool) if m]) == "Paris is the capital."


def test_rag_caching_in_the_models_own_chat_format(tok, hf):
  """RAG's caching modes with a ChatML model: the continuation after the cached embedding pass is the template's
  next user turn (no second system prompt), and with causal passes the cached continuation's logits equal the plain
  forward over the same tokens."""
  import jax
  from grit_jax import GritLM
  from grit_jax.inference import rag as rag_lib
  from grit_jax.modeling import get_config, init_params

  cfg = get_config("tiny_mistral", dtype="float32", vocab_size=tok.vocab_size, bos_token_id=1, eos_token_id=2)
  model = GritLM(cfg, init_params(cfg, jax.random.PRNGKey(0)), tok)
  q, d = "Where is the Eiffel tower?", "The Eiffel tower stands in Paris."
  full, _ = rag_lib.prompt_formats(tok.text_format)
  system = hf.apply_chat_template(messages(["x"]), tokenize=False).split("<|im_start|>user")[0]
  assert full["doc"] == hf.apply_chat_template(
      messages([f"{{doc}}\n\n{{query}}\n\n{rag_lib.DOC_FIRST}"]), tokenize=False, add_generation_prompt=True)
  for mode in ("doc", "query"):
    prep = rag_lib.prepare(model, [q], [d], mode, causal=True)
    prefix, cont = prep.prefix_ids[0], prep.continuation[0]
    assert tok.decode(prefix) == "<|embed|>\n" + (d if mode == "doc" else q)
    text = hf.batch_decode([cont])[0]
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\nThe answer is")
    assert system not in text
    ids = np.asarray([prefix + cont], np.int32)
    plain = np.asarray(model.logits(ids, np.ones_like(ids), causal=True))[0, len(prefix):]
    np.testing.assert_allclose(rag_lib.continuation_logits(model, prep)[0], plain, atol=1e-5, rtol=1e-5)
