"""grit_jax: GRIT (Generative Representational Instruction Tuning) in JAX/Flax."""
import importlib

__all__ = ["GritLM", "objectives"]


def __getattr__(name):
  # Lazy: `import grit_jax` (and `grit-jax --help`) must not pay for importing jax.
  if name == "GritLM":
    from grit_jax.inference.gritlm import GritLM
    return GritLM
  if name == "objectives":
    return importlib.import_module("grit_jax.objectives")
  raise AttributeError(f"module 'grit_jax' has no attribute {name!r}")
