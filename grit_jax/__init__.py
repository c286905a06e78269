"""grit_jax: GRIT (Generative Representational Instruction Tuning) in JAX/Flax."""
import importlib

from grit_jax.perf import host as _host

# A library user gets what the CLI's process set-up gives: jax on the CPU when the host has no accelerator (libtpu
# is installed for ahead-of-time compilation and would otherwise probe for a TPU, printing worker-hostname
# errors), and TensorFlow's start-up noise filtered. Both are cheap and import nothing heavy.
_host.default_platform()
_host.quiet_library_logs()
__all__ = ["GritLM", "objectives"]


def __getattr__(name):
  # Lazy: `import grit_jax` (and `grit-jax --help`) must not pay for importing jax.
  if name == "GritLM":
    from grit_jax.inference.gritlm import GritLM
    return GritLM
  if name == "objectives":
    return importlib.import_module("grit_jax.objectives")
  raise AttributeError(f"module 'grit_jax' has no attribute {name!r}")
