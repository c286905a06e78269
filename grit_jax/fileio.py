"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
from typing import Callable, IO


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
