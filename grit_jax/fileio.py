"""Atomic file writes (a reader, or a crash, sees the old file or the new one, never half of one), JSON reads
whose failures name the file, and where grit_jax keeps its caches."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, IO

from grit_jax.errors import GritJaxError

CACHE_ENV = "GRIT_JAX_CACHE"  # root of grit_jax's caches (default ~/.cache/grit_jax)


def cache_dir(kind: str) -> str:
  """<root>/<kind>: tfds builds ("tfds"), models converted from GGUF files ("gguf")."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "grit_jax")
  return os.path.join(root, kind)


def read_json(path: str, what: str = "JSON") -> Any:
  """The parsed file; a missing, unreadable, non-UTF-8 or malformed one is a GritJaxError naming it."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise GritJaxError(f"{path}: cannot read {what} ({e})") from e


def atomic_write(path: str, write: Callable[[IO], object], mode: str = "w") -> None:
  """Calls write(f) on a temporary file beside `path` (same filesystem), then renames it over `path`; on error the
  temporary file is removed and `path` is untouched."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
