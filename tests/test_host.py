"""grit_jax.perf.host: the CPU process set-up. The allocator claim is checked by counting page faults of a jitted
step with a large temporary, in fresh processes (the setting must precede jax's backend)."""
import json
import os
import platform
import resource
import subprocess
import sys

import pytest

from grit_jax.perf import host

_STEP_FAULTS = r"""
import json, os, resource, sys
from grit_jax.perf import host
applied = host.prepare_cpu_host()
import jax, jax.numpy as jnp
N = {N}  # each [N, N] float32 array is 64 MiB: over glibc's mmap bar, as a training step's temporaries are
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x), axis=0) * jnp.cumsum(jnp.cos(x), axis=1))
x = jnp.ones((N, N), jnp.float32) / N
faults = []
for _ in range(15):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(applied=applied, faults=faults[3:])))  # after compilation and first touches
"""


N = 4096


def _step_faults(malloc: str) -> dict:
  env = dict(os.environ, GRIT_JAX_MALLOC=malloc, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", _STEP_FAULTS.format(N=N)], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_kept_heap_stops_xla_cpu_steps_refaulting_their_buffers():
  array_pages = N * N * 4 // resource.getpagesize()
  system, kept = _step_faults("system"), _step_faults("keep")
  assert not system["applied"] and kept["applied"]
  # glibc's default: every step maps its buffers afresh and faults them in, page by page
  assert min(system["faults"]) >= array_pages, system
  # kept heap: once the heap has grown to the working set (async frees fragment it for a few steps), a step
  # reuses the previous step's pages
  assert min(kept["faults"]) < 0.01 * min(system["faults"]), (kept, system)
  assert sum(kept["faults"]) < 0.5 * sum(system["faults"]), (kept, system)


def test_default_platform(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert host.default_platform() == "tpu"  # an explicit choice is kept
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(host, "has_accelerator", lambda: False)
  assert host.default_platform() == "cpu" and os.environ["JAX_PLATFORMS"] == "cpu"
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(host, "has_accelerator", lambda: True)
  assert host.default_platform() == "" and "JAX_PLATFORMS" not in os.environ  # jax picks the accelerator


def test_prepare_leaves_accelerator_hosts_and_opt_out_alone(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert host.prepare_cpu_host() is False
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("GRIT_JAX_MALLOC", "system")
  assert host.prepare_cpu_host() is False
