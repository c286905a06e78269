"""GritLM: a loaded model (config + params + tokenizer + the settings it was trained with) and its inference API.

Two ways in, one object:
- grit_jax's: `GritLM.from_pretrained(path, dtype=...)`, or `GritLM(config, params, tokenizer)`;
- gritlm 1.0.2's: `GritLM(path, mode=..., pooling_method=..., normalized=..., attn=..., torch_dtype=...)`, with
  `encode` / `encode_queries` / `encode_corpus` / `generate` taking gritlm's arguments (docs/gritlm_compat.md).
The methods run the shared jitted programs of encode.py / generate.py (one compiled program per config and shape
bucket, whatever the instance).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grit_jax import common_types, contract, objectives
from grit_jax.convert import settings as settings_lib
from grit_jax.errors import GritJaxError
from grit_jax.inference import hf_compat
from grit_jax.modeling.config import ModelConfig
from grit_jax.modeling.model import Transformer, params_for

log = logging.getLogger(__name__)

_UNSET = object()  # "not given": the model's stored setting applies (None is a value: gritlm's attn=None)


@functools.lru_cache(maxsize=None)
def forward_fn(config: ModelConfig, causal: bool, return_logits: bool):
  """jit(params, ids [B, T], mask [B, T]) -> hidden [B, T, D] or logits [B, T, V]; one per (config, mode), so
  repeated calls with the same shapes reuse the compiled program."""
  module = Transformer(config)

  def fn(params, ids_BT, mask_BT):
    out = module.apply({"params": params}, ids_BT, mask_BT, causal=causal, return_logits=return_logits)
    return out.logits if return_logits else out.hidden

  return jax.jit(fn)


class GritLM:
  """See the module docstring. `attn` is the reference's attention string (chars 1-2 embedding passes, 3-4
  generative; b = bidirectional, c = causal; gritlm's None = causal): GritLM models use "bbcc"; a causal
  embedder ("cccc") makes query/doc RAG caching exact. Unset arguments take the model's grit_settings.json."""

  def __init__(self, model_name_or_path=None, params=None, tokenizer=None, attn=_UNSET, *, mode: str = "unified",
               pooling_method=_UNSET, normalized=_UNSET, projection=None, is_inference: bool = True,
               embed_eos: str = "", device=None, torch_dtype=None, settings: settings_lib.Settings | None = None,
               shard_weights: bool | None = None, **kwargs):
    if mode not in common_types.DATA_MODES:
      raise GritJaxError(f"mode={mode!r}: expected one of {common_types.DATA_MODES}")
    if projection is not None:
      raise GritJaxError(f"projection={projection!r}: gritlm creates this linear layer with random weights at load "
                         "time (it is not stored with the model); grit_jax has no projection head")
    if not is_inference:
      raise GritJaxError("is_inference=False: train with `grit-jax train`")
    given = {"attn": attn, "pooling": pooling_method, "normalize": normalized}
    given = {k: v for k, v in given.items() if v is not _UNSET}
    if isinstance(model_name_or_path, ModelConfig):
      if torch_dtype is not None or kwargs:
        raise GritJaxError(f"GritLM(config, params, ...): unexpected {sorted(kwargs) or ['torch_dtype']} (those "
                           "are for GritLM(path, ...))")
      config, path = model_name_or_path, None
      self._apply_settings(settings or settings_lib.Settings(), given)
      self._gritlm_style = False
    elif isinstance(model_name_or_path, (str, os.PathLike)):  # gritlm.GritLM(model_name_or_path, ...)
      if params is not None or tokenizer is not None:
        raise GritJaxError("GritLM(path, ...): params / tokenizer come from the directory")
      path, dtype = hf_compat.gritlm_path_args(model_name_or_path, kwargs, device, torch_dtype)
      self._apply_settings(settings_lib.read(path), given)  # bad values: errors before the weights
      # torch_dtype sets the weights' dtype too (as in torch); other keywords are ModelConfig fields
      params, config, tokenizer = hf_compat.load(path, dtype=dtype, param_dtype=dtype, **kwargs)
      self._gritlm_style = True
    else:
      raise GritJaxError(f"GritLM: first argument must be a ModelConfig or a model directory, got "
                         f"{type(model_name_or_path).__name__}")
    grit_tok = hf_compat.grit_tokenizer(tokenizer, config.vocab_size)
    contract.check_matryoshka_dims(self.settings.matryoshka_dims, config.hidden_size,
                                   key=f"{self.settings.source}: matryoshka_dims")
    self.config = config
    self.params = jax.tree.map(jnp.asarray, params_for(nn.meta.unbox(params), config))
    # grit_jax's Tokenizer runs the model (templates, encode, rag, serve); `tokenizer` is transformers'
    self.grit_tokenizer = grit_tok
    self._hf_tokenizer = None if grit_tok is tokenizer else tokenizer
    self.mode = mode
    self.name_or_path = path
    self.embed_eos = embed_eos
    # None: shard the weights over the local devices (FSDP) when they exceed half a device's memory (encode.placement)
    self.shard_weights = shard_weights
    self._logged: set = set()
    self._fingerprint = None
    # texts embedded and those of them cut to max_length, so far (each call also reports its own: truncation_report)
    self.truncation = {"texts": 0, "truncated": 0}
    self._call_truncation = None  # [texts, cut, {max lengths}] of the call in progress (truncation_report)

  def _apply_settings(self, stored: settings_lib.Settings, given: dict) -> None:
    """`settings`: the stored settings with explicit arguments applied (each one that differs from a stored file is
    logged); `attn_mode`: their attention, parsed (a servable one, checked now rather than at the first encode)."""
    for key, value in given.items():
      if value != getattr(stored, key) and stored.source != "defaults":
        log.warning("%s=%r overrides the model's trained %s=%r (%s)", key, value, key, getattr(stored, key),
                    stored.source)
    out = dataclasses.replace(stored, **given)
    if out.attn is not None:
      settings_lib.check(out, "GritLM")
    self.attn_mode = common_types.parse_served_attn(out.attn)
    self.settings = out

  @classmethod
  def from_pretrained(cls, path: str, dtype: str = "float32", attn=_UNSET, *, pooling=_UNSET, normalize=_UNSET,
                      shard_weights: bool | None = None, **overrides) -> "GritLM":
    """An HF directory (config.json + *.safetensors, sharded index too) or a grit_jax directory (convert
    hf-to-jax). `dtype` is the compute dtype (params stay in their param_dtype); `overrides` replace other
    ModelConfig fields (e.g. scan_layers=True). Loads `tokenizer.model` from the same directory when present, and
    the model's grit_settings.json (attn, pooling, normalize, max lengths) as the defaults; `attn`, `pooling`,
    `normalize` given here override them (logged). `shard_weights`: True / False = shard the weights over the local
    devices (FSDP) or replicate them; None = shard when they exceed half of one device's memory. A GGUF file
    (llama.cpp's format, e.g. SmolLM2's) loads as the Hugging Face directory converted from it, once per file."""
    from grit_jax.convert.gguf import model_dir
    path = model_dir(path)
    stored = settings_lib.read(path)  # a damaged file: an error before the weights are read
    params, config, tokenizer = hf_compat.load(path, dtype=dtype, **overrides)
    out = cls(config, params, tokenizer, attn, pooling_method=pooling, normalized=normalize, settings=stored,
              shard_weights=shard_weights)
    out.name_or_path = path
    return out

  def max_length(self, given: int | None = None) -> int:
    """The max tokens (template included) of an embedding pass: `given`; else, loaded as GritLM(path, ...),
    gritlm's 512 (so gritlm scripts give gritlm's vectors); else the model's embedding max length
    (convert.settings.embedding_max_len: the longer of its trained query / passage lengths, 512 without
    grit_settings.json). Every embedding entry point defaults to it."""
    if given is not None:
      if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 1:
        raise GritJaxError(f"max_length={given!r}: expected a positive integer")
      return int(given)
    if self._gritlm_style:
      return settings_lib.GRITLM_MAX_LENGTH
    return settings_lib.embedding_max_len(self.settings)

  @contextlib.contextmanager
  def truncation_report(self):
    """Everything embedded inside is one call: at its end, one warning with the number of texts cut to the max
    length (none when nothing was cut). Nested calls (eval -> encode per instruction) add to the outermost."""
    if self._call_truncation is not None:
      yield
      return
    self._call_truncation = [0, 0, set()]
    try:
      yield
    finally:
      n, cut, limits = self._call_truncation
      self._call_truncation = None
      if cut:
        log.warning("%d of %d texts (%.1f%%) truncated to %s tokens (template included; a larger max_length / "
                    "--max-length keeps them whole)", cut, n, 100 * cut / n, " / ".join(map(str, sorted(limits))))

  def count_truncation(self, tokens, max_length: int) -> None:
    """Count tokenized texts (templates.Encoded) and those cut to `max_length`, in `truncation` and in the report of
    the call in progress (or in a report of their own)."""
    with self.truncation_report():
      cut = sum(bool(t.truncated) for t in tokens)
      self.truncation["texts"] += len(tokens)
      self.truncation["truncated"] += cut
      self._call_truncation[0] += len(tokens)
      self._call_truncation[1] += cut
      if cut:
        self._call_truncation[2].add(int(max_length))

  @property
  def tokenizer(self):
    """The model's tokenizer as a transformers PreTrainedTokenizerFast with its chat template (the one
    `generate` applies), for gritlm / transformers scripts: `model.tokenizer(texts, padding=True)`,
    `apply_chat_template(..., return_tensors=...)`, `batch_decode`; the same ids as `grit_tokenizer`
    (inference.hf_compat.transformers_tokenizer). None without a tokenizer."""
    if self._hf_tokenizer is None and self.grit_tokenizer is not None:
      self._hf_tokenizer = hf_compat.transformers_tokenizer(self.grit_tokenizer, self.config.max_position_embeddings)
    return self._hf_tokenizer

  device = property(lambda self: hf_compat.DEVICE, doc="gritlm's `model.device`: where inputs are handed over")

  # the settings, under grit_jax's and gritlm's names
  attn = property(lambda self: self.settings.attn)
  pooling = pooling_method = property(lambda self: self.settings.pooling)
  normalize = normalized = property(lambda self: self.settings.normalize)

  def embedding_causal(self, attn=None) -> bool:
    """`causal` of the embedding pass: the model's attention (`attn_mode`), or a per-call `attn` string."""
    mode = self.attn_mode if attn is None or attn == self.attn else common_types.parse_served_attn(attn)
    return mode.embedding_causal

  # ---------------------------------------------------------------------------------------------------------------
  # forward passes

  def _run(self, input_ids, attention_mask, causal: bool, return_logits: bool) -> np.ndarray:
    ids = jnp.asarray(np.asarray(input_ids, np.int32))
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(np.asarray(attention_mask, np.int32))
    return np.asarray(forward_fn(self.config, bool(causal), return_logits)(self.params, ids, mask))

  def hidden_states(self, input_ids, attention_mask=None, causal: bool = False) -> np.ndarray:
    """Final-norm hidden states [B, T, D] (bidirectional by default, as for embeddings)."""
    return self._run(input_ids, attention_mask, causal, False)

  def logits(self, input_ids, attention_mask=None, causal: bool = True) -> np.ndarray:
    """LM logits [B, T, V] float32 (causal by default)."""
    return self._run(input_ids, attention_mask, causal, True)

  # ---------------------------------------------------------------------------------------------------------------
  # embeddings

  def _setting(self, key: str, value):
    """A per-call argument, or the instance's setting; a per-call value that differs is logged once."""
    if value is None or value is _UNSET:
      return getattr(self.settings, key)
    if value != getattr(self.settings, key) and (key, value) not in self._logged:
      self._logged.add((key, value))
      log.warning("%s=%r overrides the model's %s=%r", key, value, key, getattr(self.settings, key))
    return value

  def encode(self, sentences, instruction: str = "", batch_size: int = 256, max_length: int | None = None,
             pooling: str | None = None, normalize: bool | None = None, *, attn=_UNSET,
             embed_instruction: bool = False, get_cache: bool = False, convert_to_tensor: bool = False,
             recast: bool = False, add_special_tokens: bool = True, packing: bool | None = None,
             dim: int | None = None):
    """Embed texts with the GritLM template `<s><|user|>\\n{instruction}\\n<|embed|>\\n{text}` (or
    `<s><|embed|>\\n{text}` without instruction; an instruction already in gritlm's wrapped form is used as it
    is). BOS, instruction and format tokens are attended to but not pooled (`embed_instruction=True` pools them,
    as gritlm). Attention, pooling, normalisation and max_length default to the model's settings (max_length:
    `max_length()`); texts cut to max_length are counted and reported once per call (`truncation_report`).

    packing: True = whole texts packed into fixed-length rows (segment ids, positions restarting per text), False =
    batches sorted by length and padded to power-of-two length / row buckets, None (default) = the texts up to a
    row length packed and longer ones padded, with the row length (or all padded) that costs the fewest model FLOPs
    (inference.encode.choose_row_len); the same embeddings either way (1e-5), and a corpus of any size compiles only
    a few programs. dim: keep the first `dim` components (Matryoshka; re-normalised when normalising; a model
    trained with config.loss.matryoshka_dims records them in grit_settings.json, `matryoshka_dims`, and another size
    is logged once). Returns np.float32 [N, D] (D = dim or the hidden size) in input order, or [D] for a single
    string."""
    from grit_jax.inference import encode as encode_lib
    hf_compat.check_gritlm_encode_args(instruction, get_cache)
    single = isinstance(sentences, str)
    texts = [sentences] if single else list(sentences)
    self._check_dim(dim)
    causal = self.embedding_causal(None if attn is _UNSET else self._setting("attn", attn))
    pooling = self._setting("pooling", pooling)
    normalize = self._setting("normalize", normalize)
    max_length = self.max_length(max_length)
    if self._gritlm_style and not instruction and "empty_instruction" not in self._logged:
      self._logged.add("empty_instruction")
      log.warning(hf_compat.EMPTY_INSTRUCTION)
    if self.embed_eos:
      texts = [t + self.embed_eos if isinstance(t, str) else t for t in texts]
    if not texts:
      return np.zeros((0, self.config.hidden_size), np.float32)
    tokens = encode_lib.tokenize(self, texts, instruction, max_length)
    self.count_truncation(tokens, max_length)
    if embed_instruction:
      tokens = [(ids, np.ones_like(pool)) for ids, pool in tokens]
    if not add_special_tokens:
      tokens = [(ids[1:], pool[1:]) for ids, pool in tokens]
    emb = encode_lib.encode_tokens(self, tokens, batch_size, max_length, pooling, normalize, causal,
                                   packing=packing)
    if dim is not None:  # the prefix of a unit vector, re-normalised = the normalised prefix of the raw one
      emb = np.asarray(objectives.l2_normalize(emb[:, :dim])) if normalize else emb[:, :dim]
    if recast:
      emb = emb.astype(jnp.dtype(self.config.dtype))
    if convert_to_tensor:
      emb = jnp.asarray(emb)
    return emb[0] if single else emb

  @property
  def matryoshka_dims(self) -> tuple[int, ...] | None:
    """The embedding sizes the model was trained to serve truncated (grit_settings.json), or None."""
    return self.settings.matryoshka_dims

  def _check_dim(self, dim) -> None:
    if dim is None:
      return
    D = self.config.hidden_size
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= D:
      raise GritJaxError(f"dim={dim!r}: expected an integer in [1, {D}] (the model's hidden size)")
    trained = self.matryoshka_dims or ()
    if dim != D and dim not in trained and ("dim", dim) not in self._logged:
      self._logged.add(("dim", dim))
      log.warning("dim=%d: not one of the Matryoshka dims the model was trained with (%s); its prefix was not "
                  "trained to embed on its own", dim, ", ".join(map(str, trained)) or "none recorded")

  def encode_queries(self, queries, **kwargs):
    """`encode` for queries; the instruction defaults to the model's settings' query_instruction (none unless it
    records one, as gritlm's encode_queries)."""
    if self.settings.query_instruction:
      kwargs.setdefault("instruction", self.settings.query_instruction)
    return self.encode(queries, **kwargs)

  def encode_corpus(self, corpus, **kwargs):
    """`encode` for documents: strings, or {"title", "text"} dicts joined as gritlm does ("title text")."""
    return self.encode(hf_compat.corpus_texts(corpus), **kwargs)

  # ---------------------------------------------------------------------------------------------------------------
  # generation and RAG

  def generate(self, prompts_or_messages=None, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, *, do_sample: bool | None = None, input_ids=None,
               attention_mask=None, pad_token_id: int | None = None) -> list[str] | np.ndarray:
    """Chat generation. Each prompt is a user message, a list of messages alternating user/assistant (strings,
    or chat messages {"role", "content"}), ending with the user's; a single string or a single list of chat
    messages is one prompt. Each goes through the model's chat template (GritLM's
    `<s><|user|>\\n{msg}\\n<|assistant|>\\n` unless its tokenizer files have their own; a prompt already in it is
    used as it is); the batch is prefilled once and decoded with a KV cache until every row emits EOS (`</s>`).
    Greedy when temperature == 0 (or do_sample=False); otherwise temperature + top-p sampling, reproducible for a
    given seed. Returns the replies without EOS.

    Token ids in, as transformers' generate takes them (gritlm's generate is transformers'): `input_ids` (or the
    first argument) an integer [B, T] array / tensor, lists of ids, or the BatchEncoding of
    `tokenizer.apply_chat_template(..., return_dict=True)` / `tokenizer(texts, padding=True)`, with its
    `attention_mask` (padding on the left, as transformers wants, or the right: only the mask-1 tokens are the
    prompt). Returns int32 [B, T + new]: each row as given, then its generated ids up to and including EOS, the
    finished rows filled with `pad_token_id` (default: the tokenizer's pad id)."""
    from grit_jax.inference import generate as gen
    if self.mode == "embedding":
      raise GritJaxError("generate: this GritLM was loaded with mode='embedding'")
    if do_sample is not None:
      temperature = (temperature or 1.0) if do_sample else 0.0
    if input_ids is not None:
      if prompts_or_messages is not None:
        raise GritJaxError("generate: pass the prompts or input_ids=, not both")
      prompts_or_messages = input_ids
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if hf_compat.token_rows(prompts_or_messages) is not None:
      return hf_compat.generate_token_ids(self, prompts_or_messages, attention_mask, pad_token_id, **sampling)
    if attention_mask is not None:
      raise GritJaxError("generate: attention_mask goes with token ids (input_ids), not text prompts")
    seqs = self.chat_ids(prompts_or_messages)
    if not seqs:
      return []
    out = gen.generate_ids(self, seqs, **sampling)
    return [gen.decode_new(self.grit_tokenizer, o, self.config.eos_token_id) for o in out]

  def chat_ids(self, prompts_or_messages) -> list[list[int]]:
    """The token ids `generate` feeds the model for each prompt (same forms as `generate` takes): the prompt through
    the model's chat template, ending with the assistant header."""
    from grit_jax.data import templates
    from grit_jax.inference import generate as gen
    tok = self.grit_tokenizer
    if tok is None:
      raise GritJaxError("generate needs a tokenizer (tokenizer.model next to the weights)")
    fmt = templates.text_format(tok)
    return [tok.encode(templates.chat_prompt(turns, fmt)) for turns in gen.as_prompts(prompts_or_messages)]

  def build_index(self, documents: Sequence, **kwargs):
    """A RagIndex of `documents` (see inference.rag.build_index)."""
    from grit_jax.inference import rag
    return rag.build_index(self, documents, **kwargs)

  def search(self, queries, index, k: int = 10, **kwargs):
    """Top-k documents of a corpus index (`grit-jax index`; a folder or a loaded inference.corpus_index.CorpusIndex)
    for each query: a list of {"id": str, "score": float} best first (a single string: one list). Queries are
    embedded with the model's query_instruction unless `instruction=` is given; `return_text=True` adds "text",
    `on_device=True` searches exactly on the local devices (inference.corpus_index.search)."""
    from grit_jax.inference import corpus_index
    return corpus_index.search(self, queries, index, k, **kwargs)

  def rag(self, query, documents, cache: str = "doc", max_new_tokens: int = 16, **kwargs):
    """Retrieve and answer with caching mode `cache` (see inference.rag.rag)."""
    from grit_jax.inference import rag
    return rag.rag(self, query, documents, cache=cache, max_new_tokens=max_new_tokens, **kwargs)

  # ---------------------------------------------------------------------------------------------------------------
  # identity and saving

  def weights_fingerprint(self) -> str:
    """A sha256 over every tensor's name, shape, dtype and every byte of its values (one tensor on the host at a
    time): two models that differ in one weight never share it. What a RAG index and the MTEB revision record."""
    if self._fingerprint is None:
      h = hashlib.sha256()
      for path, x in jax.tree_util.tree_leaves_with_path(self.params):
        h.update(f"{jax.tree_util.keystr(path)}{tuple(x.shape)}{x.dtype}".encode())
        h.update(np.ascontiguousarray(np.asarray(x)).data)  # hashlib reads the buffer: no second copy
      self._fingerprint = h.hexdigest()[:16]
    return self._fingerprint

  def save_pretrained(self, path: str, dtype: str | None = None, max_shard_size="5GB") -> str:
    """Write a Hugging Face directory (config.json, safetensors, grit_settings.json, and the tokenizer files and
    sentence-transformers modules of convert.hf_files) atomically; replaces `path`."""
    from grit_jax.convert import servable
    # gritlm's attn=None (the model stays causal) is stored as its equivalent, cccc
    stored = dataclasses.replace(self.settings, attn=self.attn or "cccc")
    return servable.write_servable(path, self.params, self.config, self.grit_tokenizer, stored, dtype=dtype,
                                   max_shard_size=max_shard_size)
