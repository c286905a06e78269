"""Test set-up: 8 fake CPU devices (set before jax is imported) and float32 everywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from grit_jax.perf import host  # noqa: E402  (imports no jax)

host.prepare_cpu_host()  # as the CLI does: quiet TF, and on the CPU glibc keeps XLA's step buffers between steps
