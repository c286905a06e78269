"""What GritLM answers to callers written for transformers and the gritlm package: its tokenizer as a
transformers `PreTrainedTokenizerFast`, token ids in and out of `generate` as transformers' generate takes and
returns them, gritlm's dtype names and constructor keywords, and the loading of a model directory's parts.

The model runs on grit_jax's own Tokenizer (data.tokenizer: the exact piece-by-piece template encoder the training
data was built with); the transformers tokenizer is built from the same files, and their ids are checked to agree.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

import numpy as np

from grit_jax.data.corpus import document_text
from grit_jax.errors import GritJaxError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16"}
# gritlm.GritLM keywords grit_jax cannot honour: one error each rather than a silent difference
UNSUPPORTED_KWARGS = ("device_map", "load_in_4bit", "load_in_8bit", "quantization_config")
DEVICE = "cpu"  # GritLM.device: inputs stay in host memory (torch tensors `.to(model.device)` included)


def dtype_name(torch_dtype) -> str:
  """A compute dtype from gritlm's torch_dtype: a name ("bfloat16", "torch.bfloat16", "auto") or a torch dtype."""
  name = str(torch_dtype).removeprefix("torch.")
  if name in TORCH_DTYPES or name == "auto":
    return TORCH_DTYPES.get(name, name)
  raise GritJaxError(f"torch_dtype={torch_dtype!r}: expected one of {sorted(TORCH_DTYPES)} or 'auto' "
                     "(float16 is not a grit_jax compute dtype)")


def gritlm_path_args(model_name_or_path, kwargs: dict, device, torch_dtype) -> tuple[str, str]:
  """(model directory, compute dtype) of `GritLM(path, ...)` from gritlm's keywords (removed from `kwargs`, which
  keeps the ModelConfig fields: anything else is an error); what grit_jax cannot do is an error, what it ignores
  is logged. A GGUF file is its converted directory and ~ is expanded, as in from_pretrained."""
  import dataclasses

  import jax

  from grit_jax.convert.gguf import model_dir
  from grit_jax.modeling.config import ModelConfig
  path = model_dir(model_name_or_path)
  for key in UNSUPPORTED_KWARGS:
    if kwargs.pop(key, None):
      raise GritJaxError(f"GritLM({key}=...): not supported by grit_jax (shard with a mesh instead)")
  if kwargs.pop("attn_implementation", None) is not None:
    log.warning("attn_implementation is ignored: grit_jax picks its attention kernel from config attention_impl")
  if device is not None:
    log.warning("device=%r is ignored: JAX places arrays on its default backend (%s)", device,
                jax.default_backend())
  dtype = dtype_name(torch_dtype or kwargs.pop("dtype", None) or "float32")  # transformers 5's name: dtype
  if dtype == "auto":
    from grit_jax.convert import hf
    dtype = "float32" if hf.is_jax_dir(path) else TORCH_DTYPES.get(hf.hf_dtype_of(path), "float32")
  unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(ModelConfig)})
  if unknown:
    raise GritJaxError(f"GritLM(path, ...): unknown keyword(s) {unknown} (neither gritlm's nor ModelConfig fields)")
  return path, dtype


EMPTY_INSTRUCTION = ("instruction='' embeds '<|embed|>\\n{text}' (gritlm_instruction('')); gritlm 1.0.2 would embed "
                     "the bare text")


def check_gritlm_encode_args(instruction, get_cache: bool) -> None:
  """gritlm encode arguments grit_jax takes differently: one error each."""
  if isinstance(instruction, (int, np.integer)) and not isinstance(instruction, bool):
    raise GritJaxError(f"encode(texts, {instruction}): grit_jax's second positional argument is the instruction; "
                       f"pass batch_size={instruction} by name")
  if get_cache:
    raise GritJaxError("encode(get_cache=True) is not supported: use model.rag(..., cache=...) for KV caching")


def corpus_texts(corpus):
  """gritlm's encode_corpus input as texts: strings, or {"title", "text"} dicts (data.corpus.document_text)."""
  if isinstance(corpus, dict):
    corpus = [corpus]
  if isinstance(corpus, list) and corpus and isinstance(corpus[0], dict):
    for i, doc in enumerate(corpus):
      if not isinstance(doc, dict):
        raise GritJaxError(f"corpus[{i}]: expected a dict with a string 'text'")
    corpus = [document_text(doc, f"corpus[{i}]") for i, doc in enumerate(corpus)]
  return corpus


def load(path: str, dtype: str = "float32", **overrides):
  """(params, ModelConfig, grit_jax Tokenizer or None) of a model directory (convert.load.load_pretrained; its
  `tokenizer.model`, else `tokenizer.json`). A tokenizer with more pieces than config.json's vocab_size is an
  error naming it before the weights are read."""
  from grit_jax import contract
  from grit_jax.convert import load as load_lib
  from grit_jax.data.tokenizer import Tokenizer
  from grit_jax.fileio import read_json
  tokenizer = Tokenizer.from_dir(path) if os.path.isdir(path) else None
  config_path = os.path.join(path, "config.json")
  vocab = read_json(config_path).get("vocab_size") if tokenizer and os.path.isfile(config_path) else None
  if isinstance(vocab, int):
    contract.check_vocab(tokenizer.vocab_size, vocab, key=f"tokenizer {tokenizer.path}")
  config, params = load_lib.load_pretrained(path, dtype=dtype, **overrides)
  return params, config, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer, both ways


def _files_key(folder: str, names) -> str:
  h = hashlib.sha256()
  for name in sorted(names):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      from grit_jax.fileio import sha256_file
      h.update(f"{name}:{sha256_file(path)};".encode())
  return h.hexdigest()[:16]


def _cached_folder(key: str, write) -> str:
  """$GRIT_JAX_CACHE/tokenizers/<key>, written once by write(folder) into a temporary folder renamed into place
  (a reader never sees half of it; two writers: the first rename wins, the same bytes)."""
  from grit_jax.fileio import cache_dir
  out = os.path.join(cache_dir("tokenizers"), key)
  if not os.path.isdir(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{key}-")
    try:
      write(tmp)
      os.replace(tmp, out)
    except OSError:
      if not os.path.isdir(out):
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return out


def transformers_tokenizer(tok, model_max_length: int):
  """transformers.PreTrainedTokenizerFast of grit_jax's Tokenizer `tok`: the tokenizer files an export of the model
  holds (convert.hf_files.write_tokenizer_files: the model's own tokenizer.json and chat template, or its
  SentencePiece model converted by transformers' LlamaConverter with GritLM's chat template), written once per
  tokenizer into $GRIT_JAX_CACHE/tokenizers (never into the model's folder). Its ids must be `tok`'s: the
  probe texts of hf_files.check_transformers_tokenizer, and a chat through its chat template; a difference is an
  error naming the tokenizer file."""
  import transformers

  from grit_jax.convert import hf_files
  from grit_jax.data import templates
  folder = os.path.dirname(os.path.abspath(tok.path))
  key = _files_key(folder, {os.path.basename(tok.path), *hf_files.OWN_FILES})
  out = _cached_folder(key, lambda d: hf_files.write_tokenizer_files(tok, d, model_max_length))
  fast = transformers.PreTrainedTokenizerFast.from_pretrained(out, model_max_length=int(model_max_length))
  chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Why?"}]
  bos = [tok.bos_id] if tok.text_format.add_bos else []
  pairs = [(list(fast(t).input_ids), bos + tok.encode(t)) for t in hf_files.TOKENIZER_PROBES]
  pairs.append((fast.apply_chat_template(chat, add_generation_prompt=True, return_dict=False),
                tok.encode(templates.chat_prompt([m["content"] for m in chat], tok.text_format))))
  for got, want in pairs:
    if list(got) != want:
      raise GritJaxError(f"tokenizer {tok.path}: transformers' tokenizer of its files gives ids {list(got)} where "
                         f"the model's tokenizer gives {want}")
  fast._grit_jax_tokenizer = tok  # GritLM(config, params, model.tokenizer) gets the same Tokenizer back
  return fast


def grit_tokenizer(tokenizer, vocab_size: int):
  """grit_jax's Tokenizer for what a caller passes as GritLM's tokenizer: grit_jax's own; a transformers tokenizer
  GritLM built (its Tokenizer); any other PreTrainedTokenizerFast, through its saved files (tokenizer.json,
  tokenizer_config.json, chat template), kept in $GRIT_JAX_CACHE/tokenizers. One with more pieces than the
  model's `vocab_size` is an error naming it."""
  from grit_jax import contract
  from grit_jax.data.tokenizer import HF_FILE, Tokenizer
  if tokenizer is None:
    return None
  own = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "_grit_jax_tokenizer", None)
  name = own.path if own is not None else getattr(tokenizer, "name_or_path", "")
  if own is None:
    if not hasattr(tokenizer, "backend_tokenizer"):
      raise GritJaxError(f"GritLM: tokenizer of type {type(tokenizer).__name__}: expected grit_jax's Tokenizer or "
                         "a transformers PreTrainedTokenizerFast (a tokenizer.json)")
    with tempfile.TemporaryDirectory() as tmp:
      tokenizer.save_pretrained(tmp)
      out = _cached_folder("hf-" + _files_key(tmp, os.listdir(tmp)),
                           lambda d: shutil.copytree(tmp, d, dirs_exist_ok=True))
    own = Tokenizer(os.path.join(out, HF_FILE))
  contract.check_vocab(own.vocab_size, vocab_size, key=f"tokenizer {name or own.path}")
  return own


# ---------------------------------------------------------------------------------------------------------------
# token ids in and out of generate


def token_rows(x, attention_mask=None) -> list[list[int]] | None:
  """Prompts given as token ids, as lists without their padding: an integer [B, T] array / tensor, lists of ints,
  or a transformers BatchEncoding (its input_ids and attention_mask); padding (mask 0) on either side is dropped.
  None for text."""
  if hasattr(x, "keys") and "input_ids" in x:  # BatchEncoding or a dict of it
    x, attention_mask = x["input_ids"], x.get("attention_mask") if attention_mask is None else attention_mask
  rows = _int_rows(x, "input_ids")
  if rows is None or attention_mask is None:
    return rows
  mask = _int_rows(attention_mask, "attention_mask")
  if mask is None or [len(r) for r in mask] != [len(r) for r in rows]:
    raise GritJaxError("generate: attention_mask must have the shape of input_ids")
  return [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask)]


def _int_rows(x, name: str) -> list[list[int]] | None:
  if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy, jax or torch
    arr = np.asarray(x.cpu() if hasattr(x, "cpu") else x)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
      raise GritJaxError(f"generate: {name} must be an integer [batch, length] array, got {arr.dtype} "
                         f"{list(arr.shape)}")
    return arr.tolist()
  if isinstance(x, (list, tuple)) and x and all(isinstance(r, (list, tuple)) and r and
                                                all(isinstance(i, (int, np.integer)) for i in r) for r in x):
    return [list(map(int, r)) for r in x]
  return None


def generate_token_ids(model, inputs, attention_mask, pad_token_id, **sampling) -> np.ndarray:
  """transformers' generate on token ids: each row's real tokens (mask 1) are the prompt; returns the rows as given
  (padding kept) followed by the generated ids up to and including EOS, the finished rows filled with
  `pad_token_id` (default: the tokenizer's pad id) up to the longest: int32 [B, T + new]."""
  from grit_jax.inference import generate as gen
  rows = token_rows(inputs, attention_mask)
  given = token_rows(inputs["input_ids"] if hasattr(inputs, "keys") else inputs)  # as given, padding kept
  if not rows or any(not r for r in rows):
    raise GritJaxError("generate: every row of input_ids needs at least one token with attention_mask 1")
  vocab = model.config.vocab_size
  bad = [(i, t) for i, row in enumerate(rows) for t in row if not 0 <= t < vocab]
  if bad:
    raise GritJaxError(f"generate: token id {bad[0][1]} in row {bad[0][0]} is outside the vocabulary "
                       f"(0..{vocab - 1})")
  out = gen.generate_ids(model, rows, **sampling)
  if pad_token_id is None:
    pad_token_id = model.grit_tokenizer.pad_id if model.grit_tokenizer is not None else 0
  full = [list(p) + list(o) for p, o in zip(given, out)]
  out_BT = np.full((len(full), max(map(len, full))), int(pad_token_id), np.int32)
  for b, row in enumerate(full):
    out_BT[b, :len(row)] = row
  return out_BT
