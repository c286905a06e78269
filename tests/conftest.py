"""Test set-up: 8 fake CPU devices (set before jax is imported) and float32 everywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from grit_jax.perf import host  # noqa: E402  (imports no jax)

if os.environ["JAX_PLATFORMS"].split(",")[0] == "cpu":
  host.keep_heap_for_xla_cpu()  # as the CLI does on a CPU host: glibc keeps XLA's step buffers between steps
