"""ModelConfig: one frozen (hashable, usable as a static jit argument) description of a decoder-only model.

Every family (modeling/families.py: FAMILIES) is a set of plain fields the one Transformer reads; `from_hf` reads a
Hugging Face config.json of any family once, `to_hf_dict` writes one that transformers loads as that family. The
presets by name: modeling/presets.py.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from grit_jax.errors import GritJaxError
from grit_jax.fileio import read_json
from grit_jax.modeling.families import ACTIVATIONS, FAMILIES, LAYER_TYPES, ROPE_TYPES, hf_dict, hf_fields

DTYPES = ("float32", "bfloat16")
MATMUL_IMPLS = ("auto", "xla", "flat")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")  # grit_jax.modeling.kernels dispatches on these
# remat_policy -> what the scanned layer keeps for its backward pass (model._layer_class makes the jax policy):
# None = everything (no remat), () = nothing (the layer recomputed), "dots_with_no_batch_dims" = every projection's
# output, a tuple = the values of those checkpoint names (tagged in layers.Attention / layers.Mlp)
REMAT_POLICIES = {
    "none": None,
    "full": (),
    "minimal": "dots_with_no_batch_dims",
    "save_dots_except_mlp": ("query_proj", "key_proj", "value_proj", "out_proj"),
    # what a LoRA backward needs and is dear to recompute: attention's inputs and SwiGLU's (BENCHMARKS.md, LoRA)
    "save_qkv_gate_up": ("query_proj", "key_proj", "value_proj", "mlp_gate", "mlp_up"),
}
MOE_IMPLS = ("ragged", "dense")
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
  remat_policy: str = "none"              # REMAT_POLICIES
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
        bad(key, f"expected one of {tuple(allowed)}")

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
      kw = hf_fields(hf, source)
      kw.update(overrides)
      return cls(**kw)
    except TypeError as e:
      raise GritJaxError(f"{source}: {e}") from e

  def to_hf_dict(self, torch_dtype: str | None = None) -> dict:
    """A config.json transformers loads as this family's *ForCausalLM."""
    return hf_dict(self, torch_dtype)


def _period(kinds: list) -> int | None:
  """Smallest p < len(kinds) dividing it with kinds == kinds[:p] repeated (1 for one layer); None if there is none."""
  n = len(kinds)
  p = next(p for p in range(1, n + 1) if n % p == 0 and kinds == kinds[:p] * (n // p))
  return p if p == 1 or p < n else None

