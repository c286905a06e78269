"""ModelConfig: one frozen (hashable, usable as a static jit argument) description of a Mistral or Mixtral model.

Presets: `mistral_7b`, `mixtral_8x7b` (GritLM-7B / GritLM-8x7B shapes) and `tiny_mistral`, `tiny_mixtral` (tests and
demos). `from_hf` reads a Hugging Face config.json; `to_hf_dict` writes one that transformers loads.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from grit_jax.errors import GritJaxError
from grit_jax.fileio import read_json

DTYPES = ("float32", "bfloat16")
MATMUL_IMPLS = ("auto", "xla", "flat")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")  # grit_jax.modeling.kernels dispatches on these
REMAT_POLICIES = ("none", "full", "minimal", "save_dots_except_mlp")
MOE_IMPLS = ("ragged", "dense")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 14336
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  sliding_window: int | None = None       # None = full causal attention
  max_position_embeddings: int = 32768
  num_experts: int = 0                    # 0 = dense SwiGLU MLP (Mistral); > 0 = sparse MoE (Mixtral)
  num_experts_per_tok: int = 2
  router_aux_loss_coef: float = 0.0       # weight of out.aux_loss in the training loss (HF router_aux_loss_coef)
  tie_word_embeddings: bool = False
  bos_token_id: int = 1
  eos_token_id: int = 2
  dtype: str = "float32"                  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = False               # nn.scan over layers: params stacked under `layers/`
  remat_policy: str = "none"              # none | full | minimal | save_dots_except_mlp
  attention_impl: str = "auto"            # auto | xla | splash | cudnn (grit_jax.modeling.attention.attend)
  matmul_impl: str = "auto"               # auto | xla | flat: layers.Linear, attention.attend (CPU layouts)
  moe_impl: str = "ragged"                # experts: ragged (routed, grouped matmuls) | dense (all experts, reference)

  def __post_init__(self):
    def bad(key, why):
      raise GritJaxError(f"model config: {key}={getattr(self, key)!r}: {why}")

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "max_position_embeddings"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
        bad(key, "must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      bad("num_heads", f"must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      bad("head_dim", "must be even (rotary embeddings rotate pairs)")
    for key in ("rope_theta", "rms_norm_eps"):  # the rotary angles divide by theta's powers; eps keeps norms finite
      v = getattr(self, key)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        bad(key, "must be a finite number > 0")
    if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
      bad("sliding_window", "must be None or a positive integer")
    if self.num_experts < 0 or (self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts):
      bad("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
    if self.dtype not in DTYPES:
      bad("dtype", f"expected one of {DTYPES}")
    if self.param_dtype not in DTYPES:
      bad("param_dtype", f"expected one of {DTYPES}")
    if self.remat_policy not in REMAT_POLICIES:
      bad("remat_policy", f"expected one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      bad("attention_impl", f"expected one of {ATTENTION_IMPLS}")
    if self.matmul_impl not in MATMUL_IMPLS:
      bad("matmul_impl", f"expected one of {MATMUL_IMPLS}")
    if self.moe_impl not in MOE_IMPLS:
      bad("moe_impl", f"expected one of {MOE_IMPLS}")

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def replace(self, **overrides) -> "ModelConfig":
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "ModelConfig":
    """Exactly the ModelConfig fields; an unknown key is an error naming `source`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise GritJaxError(f"{source}: unknown model config key(s) {unknown}")
    return cls(**dict(d))

  # -- Hugging Face config.json ------------------------------------------------------------------------------------

  @classmethod
  def from_hf(cls, path_or_dict, **overrides) -> "ModelConfig":
    """From a Hugging Face config (a dict, a config.json path or the directory holding it). `overrides` set
    grit_jax-only fields (dtype, scan_layers, ...) or replace converted ones."""
    source = "config dict"
    if isinstance(path_or_dict, Mapping):
      hf = dict(path_or_dict)
    else:
      path = os.fspath(path_or_dict)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      source = path
      if not os.path.isfile(path):
        raise GritJaxError(f"{path}: no Hugging Face config.json")
      hf = read_json(path, "the Hugging Face config")

    model_type = hf.get("model_type")
    if model_type not in ("mistral", "mixtral"):
      raise GritJaxError(f"{source}: model_type={model_type!r}: only mistral and mixtral are supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise GritJaxError(f"{source}: hidden_act={act!r}: only silu is supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      raise GritJaxError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    theta = hf.get("rope_theta", rope.get("rope_theta", 1e6 if model_type == "mixtral" else 1e4))

    def need(key):
      if key not in hf:
        raise GritJaxError(f"{source}: missing key {key!r}")
      return hf[key]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    kw = dict(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        sliding_window=hf.get("sliding_window"),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=int(hf["bos_token_id"]) if hf.get("bos_token_id") is not None else 1,
        eos_token_id=int(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), int) else 2,
    )
    if model_type == "mixtral":
      kw.update(num_experts=int(need("num_local_experts")), num_experts_per_tok=int(need("num_experts_per_tok")),
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    kw.update(overrides)
    try:
      return cls(**kw)
    except TypeError as e:
      raise GritJaxError(f"{source}: {e}") from e

  def to_hf_dict(self, torch_dtype: str | None = None) -> dict:
    """A config.json transformers loads as MistralForCausalLM / MixtralForCausalLM."""
    moe = self.is_moe
    d = {
        "architectures": ["MixtralForCausalLM" if moe else "MistralForCausalLM"],
        "model_type": "mixtral" if moe else "mistral",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
        "sliding_window": self.sliding_window,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": torch_dtype or self.param_dtype,
    }
    if moe:
      d.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
               router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False, router_jitter_noise=0.0)
    return d


_PRESETS = {
    "mistral_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, rope_theta=1e4, rms_norm_eps=1e-5, sliding_window=4096,
                       max_position_embeddings=32768, dtype="bfloat16"),
    "mixtral_8x7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
                         max_position_embeddings=32768, num_experts=8, num_experts_per_tok=2,
                         router_aux_loss_coef=0.02, dtype="bfloat16"),
    # vocab 1024 holds the shipped ~1000-piece SentencePiece tokenizer (data/tokenizer.model).
    "tiny_mistral": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, rope_theta=1e4, rms_norm_eps=1e-5, sliding_window=None,
                         max_position_embeddings=2048, dtype="float32"),
    "tiny_mixtral": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
                         max_position_embeddings=2048, num_experts=4, num_experts_per_tok=2,
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
