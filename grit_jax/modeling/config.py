"""ModelConfig: one frozen (hashable, usable as a static jit argument) description of a decoder-only model.

The families (`FAMILIES`: mistral, mixtral, llama, qwen2, qwen3, qwen3_moe, gemma3_text) are not separate model
files: each is a short statement of how it differs (biases, q/k norm, norm form, MLP activation, RoPE, layer
pattern, experts), stored as plain fields that the one Transformer reads. `from_hf` reads a Hugging Face config.json
of any family once; `to_hf_dict` writes one that transformers loads as that family.

Presets: `mistral_7b`, `mixtral_8x7b` (GritLM-7B / GritLM-8x7B shapes), `llama3_1_8b`, `qwen3_8b`, `qwen3_30b_a3b`,
`gemma3_12b` (today's backbones) and `tiny_mistral`, `tiny_mixtral` (tests and demos).
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
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # gated MLP: SwiGLU (Llama, Qwen, Mistral) | GeGLU (Gemma)
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
# How the run computes, not what the checkpoint holds: the recipe's own even when a run loads a model.
# LoRA (grit_jax.modeling.lora): adapters over the projections named by LORA_TARGETS; the recipe's own too.
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "lora_base_dtype")
COMPUTE_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl", "matmul_impl",
                  "moe_impl") + LORA_FIELDS
# A LoRA target -> the projection it adapts (attention in every layer; the gated MLP in dense layers only: the
# experts' stacked [E, ...] matrices are not adapted, so gate/up/down on an all-MoE backbone is refused).
LORA_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj"}
LORA_MLP_TARGETS = ("gate", "up", "down")


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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str = "mistral"                 # the HF model_type (FAMILIES) config.json and exports use
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 14336
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  sliding_window: int | None = None       # None = full attention; see layer_types
  max_position_embeddings: int = 32768
  num_experts: int = 0                    # 0 = dense gated MLP; > 0 = sparse MoE (Mixtral, Qwen3-MoE)
  num_experts_per_tok: int = 2
  router_aux_loss_coef: float = 0.0       # weight of out.aux_loss in the training loss (HF router_aux_loss_coef)
  tie_word_embeddings: bool = False
  bos_token_id: int = 1
  eos_token_id: int = 2
  # -- how the families differ (FAMILIES sets them from config.json) --
  hidden_act: str = "silu"                # ACTIVATIONS: the gated MLP's activation
  qkv_bias: bool = False                  # q/k/v projections have a bias (Qwen2; Llama/Qwen3 attention_bias)
  o_bias: bool = False                    # o_proj has a bias (Llama/Qwen3 attention_bias)
  mlp_bias: bool = False                  # gate/up/down have a bias (Llama mlp_bias)
  qk_norm: bool = False                   # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
  gemma_norms: bool = False               # Gemma: (1 + w) RMSNorm, norms after attention / MLP, embeddings * sqrt(D)
  query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5; None = head_dim (Gemma sets it)
  final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap) (Gemma)
  rope_type: str = "default"              # ROPE_TYPES, for full-attention layers (and all layers without local_theta)
  rope_factor: float = 1.0                # linear / llama3 scaling factor
  rope_low_freq_factor: float = 1.0       # llama3
  rope_high_freq_factor: float = 4.0      # llama3
  rope_original_max_position: int = 8192  # llama3
  rope_local_theta: float | None = None   # sliding layers' RoPE base, unscaled (Gemma 3); None = as full layers
  layer_types: tuple[str, ...] = ()       # per layer, LAYER_TYPES; () = all sliding when sliding_window is set
  bidirectional_window: bool = False      # bidirectional sliding layers see |q - k| <= sliding_window // 2
                                          # (EmbeddingGemma); False: bidirectional passes see every token (GritLM)
  moe_intermediate_size: int | None = None  # experts' MLP width; None = intermediate_size (Mixtral)
  norm_topk_prob: bool = True             # renormalise the top-k router weights (Mixtral always; Qwen3-MoE flag)
  dense_layers: tuple[int, ...] = ()      # MoE models: layers with a dense MLP (Qwen3-MoE mlp_only_layers, ...)
  # -- how this run computes (COMPUTE_FIELDS) --
  dtype: str = "float32"                  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = False               # nn.scan over layers: params stacked under `layers/` (see scan_period)
  remat_policy: str = "none"              # none | full | minimal | save_dots_except_mlp
  attention_impl: str = "auto"            # auto | xla | splash | cudnn (grit_jax.modeling.attention.attend)
  matmul_impl: str = "auto"               # auto | xla | flat: layers.Linear, attention.attend (CPU layouts)
  moe_impl: str = "ragged"                # experts: ragged (routed, grouped matmuls) | dense (all experts, reference)
  # -- LoRA (LORA_FIELDS; grit_jax.modeling.lora): W x + (alpha / rank) * B A x, base frozen, only A, B trained --
  lora_rank: int = 0                      # 0 = off (full fine-tune)
  lora_alpha: float = 16.0                # scale alpha / rank, as peft's LoraConfig(lora_alpha)
  lora_targets: tuple[str, ...] = ("q", "k", "v", "o")  # of LORA_TARGETS
  lora_dropout: float = 0.0               # only 0.0 is implemented (refused otherwise)
  lora_base_dtype: str = "bfloat16"       # dtype the frozen base is stored in during a LoRA run

  def __post_init__(self):
    def bad(key, why):
      raise GritJaxError(f"model config: {key}={getattr(self, key)!r}: {why}")

    # JSON and ml_collections hand tuples back as lists
    for key in ("layer_types", "dense_layers", "lora_targets"):
      if isinstance(getattr(self, key), list):
        object.__setattr__(self, key, tuple(getattr(self, key)))
    if self.family not in FAMILIES:
      bad("family", f"expected one of {tuple(FAMILIES)}")
    if self.family == "mistral" and self.num_experts:  # Mixtral is Mistral with experts (configs before `family`)
      object.__setattr__(self, "family", "mixtral")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "max_position_embeddings"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
        bad(key, "must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      bad("num_heads", f"must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      bad("head_dim", "must be even (rotary embeddings rotate pairs)")
    for key in ("rope_theta", "rms_norm_eps", "rope_factor"):  # rotary angles divide by theta's powers; eps keeps
      v = getattr(self, key)                                    # norms finite
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        bad(key, "must be a finite number > 0")
    v = self.rope_local_theta
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
      bad("rope_local_theta", "must be None or a finite number > 0")
    if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
      bad("sliding_window", "must be None or a positive integer")
    if self.layer_types:
      if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
        bad("layer_types", f"expected () or {self.num_layers} entries of {LAYER_TYPES}")
      if "sliding_attention" in self.layer_types and self.sliding_window is None:
        bad("layer_types", "has sliding_attention layers but sliding_window is None")
    if self.num_experts < 0 or (self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts):
      bad("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
    if FAMILIES[self.family].moe != (self.num_experts > 0):
      bad("num_experts", f"family {self.family!r} {'needs' if FAMILIES[self.family].moe else 'has no'} experts")
    if any(not isinstance(i, int) or not 0 <= i < self.num_layers for i in self.dense_layers):
      bad("dense_layers", f"expected layer indices in [0, {self.num_layers})")
    if self.scan_layers and self.scan_period is None:
      n = self.num_layers
      own = {"layer_types": _period([self.layer_is_sliding(i) for i in range(n)]),
             "dense_layers": _period([self.layer_is_moe(i) for i in range(n)])}
      why = " and ".join(f"{k}={getattr(self, k)!r}" for k, p in own.items() if p is None) or \
          " with ".join(f"{k}={getattr(self, k)!r}" for k in own)
      bad("scan_layers", f"nn.scan needs a layer pattern that repeats: {why} give no period < num_layers={n} "
          "dividing it")
    self._check_lora(bad)
    for key, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("lora_base_dtype", DTYPES),
                         ("remat_policy", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS),
                         ("matmul_impl", MATMUL_IMPLS), ("moe_impl", MOE_IMPLS),
                         ("hidden_act", ACTIVATIONS), ("rope_type", ROPE_TYPES)):
      if getattr(self, key) not in allowed:
        bad(key, f"expected one of {allowed}")

  def _check_lora(self, bad) -> None:
    if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
      bad("lora_rank", "must be an integer >= 0 (0 = no LoRA)")
    if not self.lora_rank:
      return
    a = self.lora_alpha
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
      bad("lora_alpha", "must be a finite number > 0")
    if self.lora_dropout != 0.0:
      bad("lora_dropout", "only 0.0 is implemented")
    unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
    if unknown or not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
      bad("lora_targets", f"{unknown[0]!r} is not a projection of the backbone; expected distinct names of "
          f"{tuple(LORA_TARGETS)}" if unknown else f"expected distinct names of {tuple(LORA_TARGETS)}")
    mlp = [t for t in self.lora_targets if t in LORA_MLP_TARGETS]
    if mlp and self.is_moe and not self.dense_layers:
      bad("lora_targets", f"{mlp[0]!r}: the backbone's MLPs are all MoE experts, which LoRA does not adapt "
          "(use q, k, v, o)")

  def lora_on(self, target: str) -> bool:
    """Whether the projection of LORA_TARGETS key `target` carries a LoRA adapter."""
    return self.lora_rank > 0 and target in self.lora_targets

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def layer_is_sliding(self, i: int) -> bool:
    """Layer i attends within sliding_window (causally; bidirectionally too with bidirectional_window)."""
    if self.layer_types:
      return self.layer_types[i] == "sliding_attention"
    return self.sliding_window is not None

  def layer_is_moe(self, i: int) -> bool:
    return self.is_moe and i not in self.dense_layers

  @property
  def scan_period(self) -> int | None:
    """The smallest P dividing num_layers such that layer i and layer i + P are of the same kind (sliding?, MoE?) for
    every i: scan_layers runs nn.scan over num_layers // P blocks of P layers (1 = identical layers; Gemma 3: 6).
    None when the pattern does not repeat (only P = num_layers > 1 would fit): such a model cannot scan."""
    return _period([(self.layer_is_sliding(i), self.layer_is_moe(i)) for i in range(self.num_layers)])

  @property
  def expert_size(self) -> int:
    return self.moe_intermediate_size or self.intermediate_size

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
    """From a Hugging Face config (a dict, a config.json path or the directory holding it) of any FAMILIES
    model_type. `overrides` set grit_jax-only fields (dtype, scan_layers, ...) or replace converted ones."""
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
    try:
      kw = _from_hf(hf, source)
      kw.update(overrides)
      return cls(**kw)
    except TypeError as e:
      raise GritJaxError(f"{source}: {e}") from e

  def to_hf_dict(self, torch_dtype: str | None = None) -> dict:
    """A config.json transformers loads as this family's *ForCausalLM."""
    fam = FAMILIES[self.family]
    if fam.bias == "qkv" and (not self.qkv_bias or self.o_bias):
      raise GritJaxError(f"model config: family {self.family!r} has q/k/v biases and no o_proj bias")
    if fam.bias == "attention_bias" and self.qkv_bias != self.o_bias:
      raise GritJaxError(f"model config: family {self.family!r} has one attention_bias flag for q, k, v and o")
    if fam.bias is None and (self.qkv_bias or self.o_bias):
      raise GritJaxError(f"model config: family {self.family!r} has no attention biases")
    rope = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
    if self.rope_type != "default":
      rope["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      rope.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                  original_max_position_embeddings=self.rope_original_max_position)
    d = {
        "architectures": [fam.architecture],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": rope,
        "sliding_window": self.sliding_window,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": torch_dtype or self.param_dtype,
    }
    d["hidden_activation" if fam.gemma else "hidden_act"] = self.hidden_act
    if fam.bias == "attention_bias":
      d["attention_bias"] = self.qkv_bias
    if self.family == "llama":
      d["mlp_bias"] = self.mlp_bias
    elif self.mlp_bias:
      raise GritJaxError(f"model config: family {self.family!r} has no MLP biases")
    if fam.gemma or self.family.startswith("qwen"):  # these configs default to a pattern of their own: spell it out
      d["layer_types"] = [LAYER_TYPES[self.layer_is_sliding(i)] for i in range(self.num_layers)]
    elif self.layer_types:
      raise GritJaxError(f"model config: family {self.family!r} has no per-layer attention types")
    if self.family.startswith("qwen"):
      d["use_sliding_window"] = self.sliding_window is not None
    if fam.gemma:
      local = {"rope_type": "default", "rope_theta": self.rope_local_theta or self.rope_theta}
      d["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
      scalar = self.query_pre_attn_scalar or self.head_dim
      d.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,  # transformers: int
               final_logit_softcapping=self.final_logit_softcapping, attn_logit_softcapping=None,
               use_bidirectional_attention=False)
    if self.family == "mixtral":
      d.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
               router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False, router_jitter_noise=0.0)
    if self.family == "qwen3_moe":
      d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
               moe_intermediate_size=self.expert_size, norm_topk_prob=self.norm_topk_prob,
               decoder_sparse_step=1, mlp_only_layers=list(self.dense_layers),
               router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False)
    return d


def _from_hf(hf: dict, source: str) -> dict:
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


def _period(kinds: list) -> int | None:
  """Smallest p < len(kinds) dividing it with kinds == kinds[:p] repeated (1 for one layer); None if there is none."""
  n = len(kinds)
  p = next(p for p in range(1, n + 1) if n % p == 0 and kinds == kinds[:p] * (n // p))
  return p if p == 1 or p < n else None


def _first_id(value, default: int) -> int:
  """eos_token_id may be a list (Llama 3 Instruct): the first is the one generation stops on by default."""
  if isinstance(value, list) and value:
    value = value[0]
  return int(value) if isinstance(value, int) else default


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
