"""The families a ModelConfig describes, and their Hugging Face config.json both ways.

The families (`FAMILIES`: mistral, mixtral, llama, qwen2, qwen3, qwen3_moe, gemma3_text) are not separate model
files: each is a short statement of how it differs (biases, q/k norm, norm form, MLP activation, RoPE, layer
pattern, experts), stored as plain fields that the one Transformer reads. `hf_fields` reads a Hugging Face
config.json of any family once (`ModelConfig.from_hf`); `hf_dict` writes one that transformers loads as that family
(`ModelConfig.to_hf_dict`).
"""
from __future__ import annotations

import dataclasses

from grit_jax.errors import GritJaxError

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # gated MLP: SwiGLU (Llama, Qwen, Mistral) | GeGLU (Gemma)
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class Family:
  """How a Hugging Face model_type differs from Mistral, as far as config.json does not say it itself."""
  architecture: str                       # the transformers class its config.json names
  bias: str | None = None                 # None | "attention_bias" (the config's flag: q, k, v, o) | "qkv" (always)
  qk_norm: bool = False                   # per-head RMSNorm of q and k before RoPE
  gemma: bool = False                     # (1 + w) norms, norms after attention and MLP, embeddings * sqrt(D)
  moe: bool = False
  default_theta: float = 1e4


FAMILIES = {
    "mistral": Family("MistralForCausalLM"),
    "mixtral": Family("MixtralForCausalLM", moe=True, default_theta=1e6),
    "llama": Family("LlamaForCausalLM", bias="attention_bias"),
    "qwen2": Family("Qwen2ForCausalLM", bias="qkv"),
    "qwen3": Family("Qwen3ForCausalLM", bias="attention_bias", qk_norm=True),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", bias="attention_bias", qk_norm=True, moe=True),
    "gemma3_text": Family("Gemma3ForCausalLM", bias="attention_bias", qk_norm=True, gemma=True, default_theta=1e6),
}


def hf_fields(hf: dict, source: str) -> dict:
  """ModelConfig fields from a Hugging Face config dict; every unsupported setting is a one-line error."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise GritJaxError(f"{source}: model_type={model_type!r}: supported families are {', '.join(FAMILIES)}")
  fam = FAMILIES[model_type]

  def need(key):
    if key not in hf:
      raise GritJaxError(f"{source}: missing key {key!r}")
    return hf[key]

  act_key = "hidden_activation" if fam.gemma else "hidden_act"
  act = hf.get(act_key) or ("gelu_pytorch_tanh" if fam.gemma else "silu")
  if act not in ACTIVATIONS:
    raise GritJaxError(f"{source}: {act_key}={act!r}: supported are {ACTIVATIONS}")
  for key in ("attn_logit_softcapping", "partial_rotary_factor"):
    if hf.get(key) not in (None, 1.0):
      raise GritJaxError(f"{source}: {key}={hf[key]!r} is not supported")
  heads = int(need("num_attention_heads"))
  hidden = int(need("hidden_size"))
  num_layers = int(need("num_hidden_layers"))
  kw = dict(
      family=model_type,
      vocab_size=int(need("vocab_size")),
      hidden_size=hidden,
      intermediate_size=int(need("intermediate_size")),
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hidden // heads),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if fam.gemma else 1e-5)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", fam.gemma)),
      bos_token_id=int(hf["bos_token_id"]) if hf.get("bos_token_id") is not None else 1,
      eos_token_id=_first_id(hf.get("eos_token_id"), 2),
      hidden_act=act,
      qk_norm=fam.qk_norm,
      gemma_norms=fam.gemma,
  )
  if fam.bias == "qkv":
    kw.update(qkv_bias=True)
  elif fam.bias == "attention_bias":
    kw.update(qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)))
  kw.update(mlp_bias=bool(hf.get("mlp_bias", False)))

  # RoPE: transformers >= 5 writes rope_parameters (per layer type for Gemma 3); older files rope_theta + rope_scaling
  rope = hf.get("rope_parameters") or {}
  local = None
  if fam.gemma and "full_attention" in rope:
    rope, local = rope["full_attention"], rope.get("sliding_attention")
  if not rope or "rope_type" not in rope and "type" not in rope:
    rope = {**(hf.get("rope_scaling") or {}), **rope}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise GritJaxError(f"{source}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
  kw.update(rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", fam.default_theta))), rope_type=rope_type)
  if rope_type != "default":
    kw.update(rope_factor=float(rope["factor"]))
  if rope_type == "llama3":
    kw.update(rope_low_freq_factor=float(rope["low_freq_factor"]), rope_high_freq_factor=float(rope["high_freq_factor"]),
              rope_original_max_position=int(rope["original_max_position_embeddings"]))

  # Attention pattern
  window = hf.get("sliding_window")
  layer_types = tuple(hf.get("layer_types") or ())
  if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
    window, layer_types = None, ()  # these configs carry a sliding_window they do not use
  if layer_types and len(set(layer_types)) == 1:  # uniform: the Mistral form, which nn.scan can stack
    window = window if layer_types[0] == "sliding_attention" else None
    layer_types = ()
  if fam.gemma:
    # use_bidirectional_attention (EmbeddingGemma) is not read: here the attention mode is an argument of each
    # call, and bidirectional calls of a Gemma model always keep the symmetric window on sliding layers.
    if not hf.get("layer_types") and window is not None:  # transformers' default pattern: every 6th layer full
      pattern = int(hf.get("sliding_window_pattern", 6))
      layer_types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))
    local_theta = (local or {}).get("rope_theta", hf.get("rope_local_base_freq", 1e4))
    kw.update(rope_local_theta=float(local_theta), query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
              final_logit_softcapping=hf.get("final_logit_softcapping"), bidirectional_window=True)
  kw.update(sliding_window=window, layer_types=layer_types)

  if model_type == "mixtral":
    kw.update(num_experts=int(need("num_local_experts")), num_experts_per_tok=int(need("num_experts_per_tok")),
              router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
  if model_type == "qwen3_moe":
    step = int(hf.get("decoder_sparse_step", 1))
    only = set(int(i) for i in hf.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(num_layers) if i in only or (i + 1) % step)
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # the Hub's name, transformers 5's
    if experts is None:
      raise GritJaxError(f"{source}: missing key 'num_experts'")
    kw.update(num_experts=int(experts), num_experts_per_tok=int(need("num_experts_per_tok")),
              moe_intermediate_size=int(need("moe_intermediate_size")),
              norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dense_layers=dense,
              router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
  return kw


def _first_id(value, default: int) -> int:
  """eos_token_id may be a list (Llama 3 Instruct): the first is the one generation stops on by default."""
  if isinstance(value, list) and value:
    value = value[0]
  return int(value) if isinstance(value, int) else default


def hf_dict(c, torch_dtype: str | None = None) -> dict:
  """A config.json transformers loads as the family's *ForCausalLM, from ModelConfig `c`."""
  fam = FAMILIES[c.family]
  if fam.bias == "qkv" and (not c.qkv_bias or c.o_bias):
    raise GritJaxError(f"model config: family {c.family!r} has q/k/v biases and no o_proj bias")
  if fam.bias == "attention_bias" and c.qkv_bias != c.o_bias:
    raise GritJaxError(f"model config: family {c.family!r} has one attention_bias flag for q, k, v and o")
  if fam.bias is None and (c.qkv_bias or c.o_bias):
    raise GritJaxError(f"model config: family {c.family!r} has no attention biases")
  rope = {"rope_theta": c.rope_theta, "rope_type": c.rope_type}
  if c.rope_type != "default":
    rope["factor"] = c.rope_factor
  if c.rope_type == "llama3":
    rope.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                original_max_position_embeddings=c.rope_original_max_position)
  d = {
      "architectures": [fam.architecture],
      "model_type": c.family,
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "max_position_embeddings": c.max_position_embeddings,
      "rms_norm_eps": c.rms_norm_eps,
      "rope_parameters": rope,
      "sliding_window": c.sliding_window,
      "tie_word_embeddings": c.tie_word_embeddings,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": c.eos_token_id,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "dtype": torch_dtype or c.param_dtype,
  }
  d["hidden_activation" if fam.gemma else "hidden_act"] = c.hidden_act
  if fam.bias == "attention_bias":
    d["attention_bias"] = c.qkv_bias
  if c.family == "llama":
    d["mlp_bias"] = c.mlp_bias
  elif c.mlp_bias:
    raise GritJaxError(f"model config: family {c.family!r} has no MLP biases")
  if fam.gemma or c.family.startswith("qwen"):  # these configs default to a pattern of their own: spell it out
    d["layer_types"] = [LAYER_TYPES[c.layer_is_sliding(i)] for i in range(c.num_layers)]
  elif c.layer_types:
    raise GritJaxError(f"model config: family {c.family!r} has no per-layer attention types")
  if c.family.startswith("qwen"):
    d["use_sliding_window"] = c.sliding_window is not None
  if fam.gemma:
    local = {"rope_type": "default", "rope_theta": c.rope_local_theta or c.rope_theta}
    d["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    scalar = c.query_pre_attn_scalar or c.head_dim
    d.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,  # transformers: int
             final_logit_softcapping=c.final_logit_softcapping, attn_logit_softcapping=None,
             use_bidirectional_attention=False)
  if c.family == "mixtral":
    d.update(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
             router_aux_loss_coef=c.router_aux_loss_coef, output_router_logits=False, router_jitter_noise=0.0)
  if c.family == "qwen3_moe":
    d.update(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
             moe_intermediate_size=c.expert_size, norm_topk_prob=c.norm_topk_prob,
             decoder_sparse_step=1, mlp_only_layers=list(c.dense_layers),
             router_aux_loss_coef=c.router_aux_loss_coef, output_router_logits=False)
  return d
