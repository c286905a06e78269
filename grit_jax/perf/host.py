"""Process set-up, done before jax starts its backend: pick the platform, keep third-party start-up noise away from
the user (quiet_library_logs), and on a CPU host stop glibc from handing XLA's step buffers back to the kernel
after every step.

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
import importlib.abc
import importlib.machinery
import logging
import os
import platform
import re
import sys
import tempfile

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
  """default_platform() and quiet_library_logs(), then keep_heap_for_xla_cpu() when jax will run on the CPU. For
  entry points (the CLI, the demo, the bench scripts, the test set-up); returns whether the allocator was tuned."""
  quiet_library_logs()
  return default_platform() == "cpu" and keep_heap_for_xla_cpu()


# ---------------------------------------------------------------------------------------------------------------
# Third-party noise. TensorFlow (used only by the training data pipeline) writes its start-up lines from C++ before
# absl's logging is initialised, so TF_CPP_MIN_LOG_LEVEL does not reach them; seqio and tfds log warnings about
# settings that are ours on purpose. Each known line is dropped by pattern; everything else is still shown.

NOISE_LINES = tuple(re.compile(p) for p in (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"I\d{4} [\d:. ]+\d+ \S+\] ",  # C++ INFO lines (oneDNN custom operations, cudart stub, ...)
    r"E\d{4} [\d:. ]+\d+ cuda_(platform|executor|diagnostics)\.cc:\d+\] .*(cuInit|CUDA|kernel driver)",
    r"W\d{4} [\d:. ]+\d+ \S+\] .*(TensorRT|cuda|CUDA)",
))
NOISE_RECORDS = (
    "Using custom data configuration",  # tfds: our builder configs are custom by design
    "T5 library uses PAD_ID=0",  # seqio: our pad id is 0 on purpose (Tokenizer.pad_id)
)


QUIET_PACKAGES = ("tensorflow", "tensorflow_datasets", "seqio")


def is_noise(line: str) -> bool:
  return any(p.match(line) for p in NOISE_LINES)


class _DropNoiseRecords(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(NOISE_RECORDS)


def _filtered_stderr(run):
  """run() with file descriptor 2 (C++ and Python writes alike) captured; the lines that are not noise are then
  written to stderr in their order."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      return run()
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = [l for l in capture.read().decode("utf-8", "replace").splitlines(keepends=True) if not is_noise(l)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()




def _exec_quietly(exec_module):
  """Wraps a package loader's exec_module: TensorFlow runs under _filtered_stderr (and, on a host without an
  accelerator, so does its CUDA probe); afterwards the absl logger (each of QUIET_PACKAGES imports absl.logging)
  drops the known records."""

  def run(module):
    if module.__name__ == "tensorflow":
      def body():
        exec_module(module)
        if not has_accelerator():
          module.config.list_physical_devices("GPU")  # the "failed call to cuInit" line comes out here
      _filtered_stderr(body)
    else:
      exec_module(module)
    from absl import logging as absl_logging
    logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _DropNoiseRecords) for f in logger.filters):
      logger.addFilter(_DropNoiseRecords())

  return run


class _QuietFinder(importlib.abc.MetaPathFinder):
  """Finds QUIET_PACKAGES as Python would, with only the loader's exec_module wrapped (the loader itself, which
  serves the package's resources, stays the real one)."""

  def find_spec(self, fullname, path, target=None):
    if fullname not in QUIET_PACKAGES:
      return None
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is not None and hasattr(spec.loader, "exec_module"):
      spec.loader.exec_module = _exec_quietly(spec.loader.exec_module)
    return spec


def quiet_library_logs() -> None:
  """Whenever something imports TensorFlow, tfds or seqio, their known noise is filtered (NOISE_LINES,
  NOISE_RECORDS). Call before they are imported; idempotent; imports nothing."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietFinder())
