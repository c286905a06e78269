"""Decode tokens/s and embedding sequences/s: grit_jax vs transformers on the same weights, same CPU: a tiny random
Mistral (--preset), or a real model (--model: an HF directory or a GGUF file, e.g. SmolLM2's).

  .venv/bin/python bench/inference_vs_torch.py [--preset tiny_mistral] [--batch 1] [--new-tokens 128]
  .venv/bin/python bench/inference_vs_torch.py --model "$(.venv/bin/python -c 'from grit_jax.convert import gguf; print(gguf.smollm2_path())')"

The Hugging Face model is built from our config (`to_hf_dict`), saved, and loaded by `GritLM.from_pretrained`, so
both run the same weights (checked: logits agree). Decode: greedy, exactly --new-tokens tokens after a 32-token
prompt (HF `generate` with min_new_tokens; ours with stop_at_eos=False). Embedding: bidirectional pass + mean
pooling over 64 sequences of 128 tokens (HF through a padding-only 4D mask). Compilation / first calls excluded.
Ratios > 1 mean grit_jax is faster.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from _common import median_seconds  # noqa: E402  (also puts the repo on sys.path)

import numpy as np  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="tiny_mistral")
  p.add_argument("--model", default=None, help="an HF directory or GGUF file instead of a random --preset model")
  p.add_argument("--tokenizer", default="data/tokenizer.model")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt-tokens", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--embed-seqs", type=int, default=64)
  p.add_argument("--embed-len", type=int, default=128)
  p.add_argument("--runs", type=int, default=5)
  a = p.parse_args(argv)

  import torch
  import transformers

  from grit_jax.data.tokenizer import Tokenizer
  from grit_jax.inference import encode as encode_lib
  from grit_jax.inference import generate as gen
  from grit_jax.inference.gritlm import GritLM
  from grit_jax.modeling import get_config

  if a.model:  # a real model: both sides load the same directory
    from grit_jax.convert.gguf import model_dir
    src = model_dir(a.model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = GritLM.from_pretrained(src, dtype="float32")
    tok, a.preset = model.grit_tokenizer, os.path.basename(src)
  else:
    tok = Tokenizer(a.tokenizer)
    cfg = get_config(a.preset, dtype="float32")
    tmp = tempfile.mkdtemp()
    try:
      hf_cfg = transformers.MistralConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
      torch.manual_seed(0)
      hf = transformers.MistralForCausalLM(hf_cfg).eval()
      hf.save_pretrained(tmp)
      shutil.copy(a.tokenizer, os.path.join(tmp, "tokenizer.model"))
      model = GritLM.from_pretrained(tmp, dtype="float32")
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  rng = np.random.default_rng(0)

  # same weights: compare logits once
  ids = rng.integers(3, tok.vocab_size, size=(2, 24)).astype(np.int32)
  with torch.no_grad():
    ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  diff = np.abs(np.asarray(model.logits(ids, np.ones_like(ids), causal=True)) - ref).max()
  print(f"model {a.preset}: {sum(p.numel() for p in hf.parameters()) / 1e6:.2f}M params; "
        f"max |logits diff| jax vs torch = {diff:.2e}; torch threads {torch.get_num_threads()}")

  # decode
  prompt = rng.integers(3, tok.vocab_size, size=(a.batch, a.prompt_tokens))
  prompt[:, 0] = 1
  pt = torch.tensor(prompt, dtype=torch.long)

  def hf_decode():
    with torch.no_grad():
      out = hf.generate(pt, attention_mask=torch.ones_like(pt), max_new_tokens=a.new_tokens,
                        min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == a.prompt_tokens + a.new_tokens
    return out

  def jax_decode():
    out = gen.generate_ids(model, prompt.tolist(), max_new_tokens=a.new_tokens, stop_at_eos=False)
    assert all(len(o) == a.new_tokens for o in out)
    return out

  same = hf_decode()[:, a.prompt_tokens:].tolist() == jax_decode()
  t_hf, t_jax = median_seconds(hf_decode, a.runs, warmup=2), median_seconds(jax_decode, a.runs, warmup=2)
  n = a.batch * a.new_tokens
  print(f"decode  (batch {a.batch}, {a.new_tokens} new tokens, greedy; same tokens: {same}): "
        f"torch {n / t_hf:8.1f} tok/s | jax {n / t_jax:8.1f} tok/s | ratio jax/torch {t_hf / t_jax:.2f}x")

  # embeddings
  seqs = rng.integers(3, tok.vocab_size, size=(a.embed_seqs, a.embed_len))
  seqs[:, 0] = 1
  pool = np.ones_like(seqs)
  pool[:, :7] = 0  # the `<s><|embed|>\n` prefix is not pooled
  tokens = [(s.astype(np.int32), m.astype(np.int32)) for s, m in zip(seqs, pool)]
  st, pm = torch.tensor(seqs, dtype=torch.long), torch.tensor(pool, dtype=torch.float32)
  bidir = torch.ones((a.embed_seqs, 1, a.embed_len, a.embed_len), dtype=torch.bool)

  def hf_embed():
    with torch.no_grad():
      h = hf.model(input_ids=st, attention_mask=bidir).last_hidden_state
      e = (h * pm[..., None]).sum(1) / pm.sum(1, keepdim=True)
      return torch.nn.functional.normalize(e, dim=-1).numpy()

  def jax_embed():
    return encode_lib.encode_tokens(model, tokens, batch_size=a.embed_seqs, max_length=a.embed_len)

  emb_diff = np.abs(hf_embed() - jax_embed()).max()
  t_hf, t_jax = median_seconds(hf_embed, a.runs, warmup=2), median_seconds(jax_embed, a.runs, warmup=2)
  print(f"embed   ({a.embed_seqs} x {a.embed_len} tokens, bidirectional, mean; max |diff| {emb_diff:.1e}): "
        f"torch {a.embed_seqs / t_hf:8.1f} seq/s | jax {a.embed_seqs / t_jax:8.1f} seq/s | "
        f"ratio jax/torch {t_hf / t_jax:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
