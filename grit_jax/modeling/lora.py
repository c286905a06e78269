"""LoRA (ModelConfig.lora_*): each targeted projection W [*in, *out] gets y = x W + (alpha / r) (x A) B with
A [*in, r] (peft's kaiming-uniform init) and B [r, *out] (zeros), as `layers.Linear` computes it. The params tree
then holds `lora_a` / `lora_b` next to each targeted `kernel`; these helpers split it into the frozen base and the
trainable adapters (the train state keeps the base apart, in lora_base_dtype, and checkpoints only the adapters),
join them again, and fold the adapters into the kernels for a plain export (`merge`).

Which projections: ModelConfig.LORA_TARGETS (attention q/k/v/o in every layer; gate/up/down in dense MLP layers; the
MoE experts' stacked matrices are not adapted).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from grit_jax.modeling.config import ModelConfig

ADAPTER_LEAVES = ("lora_a", "lora_b")


def base_config(config: ModelConfig) -> ModelConfig:
  """The same network without adapters (what the base checkpoint and a merged export hold)."""
  return config.replace(lora_rank=0)


def split(params: dict) -> tuple[dict, dict]:
  """(base, adapters): the nested params dict without / with only the `lora_a` / `lora_b` leaves (any leaf type:
  arrays, boxed, abstract)."""
  base, adapters = {}, {}
  for k, v in params.items():
    if isinstance(v, dict):
      b, a = split(v)
      if b:
        base[k] = b
      if a:
        adapters[k] = a
    elif k in ADAPTER_LEAVES:
      adapters[k] = v
    else:
      base[k] = v
  return base, adapters


def combine(base: dict, adapters: dict) -> dict:
  """The inverse of `split`: one params dict the LoRA model applies."""
  out = dict(base)
  for k, v in adapters.items():
    out[k] = combine(out.get(k, {}), v) if isinstance(v, dict) else v
  return out


def merge(params: dict, scale: float, xp=jnp) -> dict:
  """Params with every adapter folded into its kernel, W + scale * A B, computed in float32 (`xp`: jnp or np); the
  result has no adapter leaves (a plain model of `base_config`). Works in any layer layout: A [*lead, *in, r],
  B [*lead, r, *out] with the kernel [*lead, *in, *out] (lead = the scanned layer axes)."""
  out = {}
  for k, v in params.items():
    if not isinstance(v, dict):
      out[k] = v
    elif "lora_a" in v:
      kernel, a, b = v["kernel"], v["lora_a"], v["lora_b"]
      out_shape = kernel.shape[a.ndim - 1:]
      lead = b.shape[:b.ndim - 1 - len(out_shape)]
      n_lead, r = math.prod(lead), a.shape[-1]
      a_LIr = xp.asarray(a, xp.float32).reshape(n_lead, -1, r)
      b_LrO = xp.asarray(b, xp.float32).reshape(n_lead, r, -1)
      delta = xp.einsum("lir,lro->lio", a_LIr, b_LrO).reshape(kernel.shape)
      out[k] = {n: x for n, x in v.items() if n not in ADAPTER_LEAVES}
      out[k]["kernel"] = xp.asarray(kernel, xp.float32) + scale * delta
    else:
      out[k] = merge(v, scale, xp)
  return out


def scale(config: ModelConfig) -> float:
  return config.lora_alpha / config.lora_rank


def num_adapter_params(params: dict) -> int:
  return sum(int(np.prod(x.shape)) for x in _leaves(split(params)[1]))


def _leaves(tree):
  for v in tree.values():
    yield from (_leaves(v) if isinstance(v, dict) else (v,))
