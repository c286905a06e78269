"""GritLM: a loaded model (config + params + tokenizer) with numpy-in, numpy-out forward passes."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grit_jax.modeling.config import ModelConfig
from grit_jax.modeling.model import Transformer, params_for


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
  """`GritLM(config, params, tokenizer=None, attn="bbcc")`; `GritLM.from_pretrained(dir)` for HF or grit_jax dirs.

  `attn` is the reference's attention string (chars 1-2 embedding passes, 3-4 generative; b = bidirectional,
  c = causal): GritLM models use "bbcc"; a causal embedder ("cccc") makes query/doc RAG caching exact.
  """

  # encode / generate / rag live in their own modules (each a function of the model); bound here as methods.
  from grit_jax.inference.encode import encode
  from grit_jax.inference.generate import generate
  from grit_jax.inference.rag import rag

  def __init__(self, config: ModelConfig, params, tokenizer=None, attn: str = "bbcc"):
    if len(attn) != 4 or set(attn) - {"b", "c"}:
      raise ValueError(f"attn must be 4 characters of b/c like 'bbcc', got {attn!r}")
    self.config = config
    self.params = jax.tree.map(jnp.asarray, params_for(nn.meta.unbox(params), config))
    self.tokenizer = tokenizer
    self.attn = attn

  @classmethod
  def from_pretrained(cls, path: str, dtype: str = "float32", attn: str = "bbcc", **overrides) -> "GritLM":
    """An HF directory (config.json + *.safetensors, sharded index too) or a grit_jax directory (convert
    hf-to-jax). `dtype` is the compute dtype (params stay in their param_dtype); `overrides` replace other
    ModelConfig fields (e.g. scan_layers=True). Loads `tokenizer.model`, else `tokenizer.json`, from the same
    directory when present."""
    from grit_jax.convert import hf
    config, params = hf.load_pretrained(path, dtype=dtype, **overrides)
    from grit_jax.data.tokenizer import Tokenizer
    return cls(config, params, Tokenizer.from_dir(path), attn=attn)

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

  def save_pretrained(self, path: str, dtype: str | None = None, max_shard_size="5GB") -> str:
    """Write a Hugging Face directory (config.json, safetensors, the tokenizer files and sentence-transformers
    modules of convert.hf_files) atomically; replaces `path`."""
    from grit_jax.convert import hf, hf_files
    with hf.atomic_dir(path, overwrite=True) as tmp:
      hf.save_hf(self.params, self.config, tmp, max_shard_size=max_shard_size, dtype=dtype)
      hf_files.write_export_files(self.tokenizer, tmp, self.config, attn=self.attn)
    return path
