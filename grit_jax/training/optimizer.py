"""AdamW with the reference's schedule: linear warmup over warmup_ratio of the steps, then linear decay to 0
(HF get_linear_schedule_with_warmup), global-norm clipping first, no weight decay by default.

The learning rate is an injected hyperparameter, so the value each update used sits in the optimizer state
(`current_lr`) and is logged without recomputing the schedule.
"""
from __future__ import annotations

import math

import jax
import optax

from grit_jax.errors import GritJaxError


def warmup_steps(optimizer_cfg, total_steps: int) -> int:
  """ceil(warmup_ratio * total_steps), as HF TrainingArguments.get_warmup_steps (3% of 1253 = 38)."""
  return int(math.ceil(optimizer_cfg.warmup_ratio * total_steps))


def make_schedule(optimizer_cfg, total_steps: int) -> optax.Schedule:
  """lr(count): 0 -> lr linearly over the warmup steps, then lr -> 0 linearly at `total_steps` (count = number of
  updates already applied, so the first update uses lr(0))."""
  if total_steps < 1:
    raise GritJaxError(f"config.train.steps={total_steps}: must be >= 1")
  if not 0.0 <= optimizer_cfg.warmup_ratio <= 1.0:
    raise GritJaxError(f"config.optimizer.warmup_ratio={optimizer_cfg.warmup_ratio}: must be in [0, 1]")
  lr = optimizer_cfg.lr
  warm = warmup_steps(optimizer_cfg, total_steps)
  decay = optax.linear_schedule(lr, 0.0, max(total_steps - warm, 1))
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def _decay_mask(params):
  # No decay on norm scales (1-D), as HF Trainer excludes LayerNorm weights.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optimizer_cfg, total_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> AdamW(b1, b2, eps, weight_decay) with the warmup/decay schedule."""
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=make_schedule(optimizer_cfg, total_steps), b1=optimizer_cfg.b1, b2=optimizer_cfg.b2,
      eps=optimizer_cfg.eps, weight_decay=optimizer_cfg.weight_decay, mask=_decay_mask)
  if optimizer_cfg.grad_clip and optimizer_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optimizer_cfg.grad_clip), adamw)
  return optax.chain(optax.identity(), adamw)


def current_lr(opt_state):
  """The learning rate the last update used (from the injected hyperparameters of `make_optimizer`'s state)."""
  has_lr = lambda x: isinstance(getattr(x, "hyperparams", None), dict) and "learning_rate" in x.hyperparams
  for s in jax.tree.leaves(opt_state, is_leaf=has_lr):
    if has_lr(s):
      return s.hyperparams["learning_rate"]
  raise ValueError("optimizer state has no injected learning rate (not built by make_optimizer)")
