"""Tiny random Hugging Face Mistral / Mixtral models saved to temporary directories (parity-test fixtures)."""
from __future__ import annotations

import numpy as np

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
            initializer_range=0.1, tie_word_embeddings=False)


def make_hf_model(kind: str, path, seed: int = 0, **overrides):
  """A random MistralForCausalLM / MixtralForCausalLM (float32, eval mode) saved with save_pretrained to `path`.
  Weights use std 0.1 and random RMSNorm scales so logits are O(1) and every tensor matters."""
  import torch
  import transformers

  kw = dict(TINY, **overrides)
  if kind == "mistral":
    kw.setdefault("sliding_window", None)
    config, cls = transformers.MistralConfig(**kw), transformers.MistralForCausalLM
  elif kind == "mixtral":
    kw.setdefault("num_local_experts", 4)
    kw.setdefault("num_experts_per_tok", 2)
    config, cls = transformers.MixtralConfig(**kw), transformers.MixtralForCausalLM
  else:
    raise ValueError(kind)
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def random_batch(rng: np.random.RandomState, lengths, vocab: int, T: int | None = None):
  """Right-padded ids [B, T] (padding ids are random too: they must not matter) and mask [B, T] int32."""
  T = T or max(lengths)
  ids = rng.randint(3, vocab, size=(len(lengths), T)).astype(np.int32)
  mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids, mask


def torch_logits(model, ids, mask=None):
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long))
  return out.logits.float().numpy()
