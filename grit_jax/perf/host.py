"""Process set-up for a CPU host, done before jax starts its backend: pick the platform, and stop glibc from
handing XLA's step buffers back to the kernel after every step.

Why the allocator: XLA:CPU allocates each execution's temporaries (one buffer of tens of MB to GBs) with
posix_memalign from its worker threads. glibc serves a block that large with a fresh mmap (a worker thread's arena
cannot hold more than 64 MB, and the main arena maps anything over its 32 MB ceiling) and munmaps it on free, so
every step faults its whole working set in again and the kernel zeroes it page by page: 17.7k faults per step on
the tiny recipe, 0.56M (2.2 GB) at ~125M parameters, a quarter of the step's CPU time. With one arena, no mmap and
no trimming, the heap keeps the pages and the next step reuses them: 0 faults per step, tiny 60 -> 42 ms and
~125M 7.9 -> 6.2 s (bench/vs_torch.py; BENCHMARKS.md). The price: resident memory stays at the peak of a step,
which a training process reaches every step anyway. tcmalloc (LD_PRELOAD, as MaxText does) gets the same.

Accelerator hosts are left alone (their step buffers live in device memory, and one arena would serialise the
input pipeline's threads); so are processes started with GRIT_JAX_MALLOC=system and non-glibc C libraries.
"""
from __future__ import annotations

import ctypes
import glob
import os
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def has_accelerator() -> bool:
  """A TPU (/dev/accel*, /dev/vfio/N) or an NVIDIA GPU is attached to this host."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.path.exists("/dev/nvidia0"))


def default_platform() -> str:
  """JAX_PLATFORMS=cpu on a host with no accelerator, unless it is set already (libtpu is installed for
  ahead-of-time compilation; without this jax would probe for a TPU that is not there). Returns the first platform
  jax will try ("" = its own choice)."""
  if "JAX_PLATFORMS" not in os.environ and not has_accelerator():
    os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip()


def keep_heap_for_xla_cpu() -> bool:
  """One malloc arena, no mmap'd blocks, never trim the heap (the module docstring says why). Call before jax
  creates its CPU backend: threads that have already made their own arena keep it. Returns whether it was applied:
  glibc only, and not when GRIT_JAX_MALLOC=system."""
  if os.environ.get("GRIT_JAX_MALLOC", "keep").lower() == "system":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  # mallopt takes an int: -1 for the trim threshold becomes SIZE_MAX inside glibc, i.e. never trim.
  return all(mallopt(param, value) == 1 for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
                                                              (M_TRIM_THRESHOLD, -1)))


def prepare_cpu_host() -> bool:
  """default_platform(), then keep_heap_for_xla_cpu() when jax will run on the CPU. For entry points (the CLI, the
  demo, the bench scripts, the test set-up); returns whether the allocator was tuned."""
  return default_platform() == "cpu" and keep_heap_for_xla_cpu()
