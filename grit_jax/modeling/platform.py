"""Which platform the current trace compiles for: the one question every kernel choice (attention, matmul layout)
asks. Its own module so the kernels and the modules that dispatch to them import it without importing each other."""
from __future__ import annotations

import jax


def target_platform() -> str:
  """"tpu" | "gpu" | "cuda" | "cpu": the platform of the context mesh's devices (set by `jax.set_mesh`), else the
  default backend.

  The mesh answers through its abstract device, which is also what a mesh of TPU topology devices described on a
  CPU host carries (`grit-jax aot`): there the program is compiled for TPU although `jax.default_backend()` is
  "cpu", and the kernels must be the TPU ones.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    device = getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None)
    if platform:
      return platform
  return jax.default_backend()
