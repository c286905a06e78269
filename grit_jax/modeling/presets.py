"""The model presets: `mistral_7b`, `mixtral_8x7b` (GritLM-7B / GritLM-8x7B shapes), `llama3_1_8b`, `qwen3_8b`,
`qwen3_30b_a3b`, `gemma3_12b` (today's backbones) and `tiny_mistral`, `tiny_mixtral` (tests and demos), by name
(`get_config`, re-exported as `grit_jax.modeling.get_config`)."""
from __future__ import annotations

import dataclasses

from grit_jax.errors import GritJaxError
from grit_jax.modeling.config import ModelConfig


_PRESETS = {
    "mistral_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, rope_theta=1e4, rms_norm_eps=1e-5, sliding_window=4096,
                       max_position_embeddings=32768, dtype="bfloat16"),
    "mixtral_8x7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
                         max_position_embeddings=32768, family="mixtral", num_experts=8, num_experts_per_tok=2,
                         router_aux_loss_coef=0.02, dtype="bfloat16"),
    # Today's backbones (their config.json on the Hub; init_from=hf:DIR reads the same fields from the file)
    "llama3_1_8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5e5, rms_norm_eps=1e-5,
                        max_position_embeddings=131072, rope_type="llama3", rope_factor=8.0,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
                        bos_token_id=128000, eos_token_id=128001, dtype="bfloat16"),
    "qwen3_8b": dict(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                     num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=True,
                     max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645, dtype="bfloat16"),
    "qwen3_30b_a3b": dict(family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, rope_theta=1e6,
                          rms_norm_eps=1e-6, qk_norm=True, max_position_embeddings=40960, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          router_aux_loss_coef=0.001, bos_token_id=151643, eos_token_id=151645, dtype="bfloat16"),
    "gemma3_12b": dict(family="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                       num_layers=48, num_heads=16, num_kv_heads=8, head_dim=256, rope_theta=1e6, rms_norm_eps=1e-6,
                       hidden_act="gelu_pytorch_tanh", qk_norm=True, gemma_norms=True, query_pre_attn_scalar=256.0,
                       rope_type="linear", rope_factor=8.0, rope_local_theta=1e4, sliding_window=1024,
                       layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                         for i in range(48)),
                       bidirectional_window=True, tie_word_embeddings=True, max_position_embeddings=131072,
                       bos_token_id=2, eos_token_id=1, dtype="bfloat16"),
    # vocab 1024 holds the shipped ~1000-piece SentencePiece tokenizer (data/tokenizer.model).
    "tiny_mistral": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, rope_theta=1e4, rms_norm_eps=1e-5, sliding_window=None,
                         max_position_embeddings=2048, dtype="float32"),
    "tiny_mixtral": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
                         max_position_embeddings=2048, family="mixtral", num_experts=4, num_experts_per_tok=2,
                         router_aux_loss_coef=0.02, dtype="float32"),
}


PRESETS = tuple(_PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
  """A preset by name with fields replaced by `overrides`."""
  if name not in _PRESETS:
    raise GritJaxError(f"model preset {name!r}: expected one of {PRESETS}")
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise GritJaxError(f"model preset {name!r}: unknown override key(s) {unknown}")
  return ModelConfig(**{**_PRESETS[name], **overrides})
