"""The file handling under every weight format of convert/: safetensors files read one tensor at a time (a damaged
header or tensor, or NaN / inf weights, named by file and tensor), written with the user's umask; output folders
replaced atomically (`atomic_dir`); param trees <-> '/'-joined flat names; shard sizes ("5GB")."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from grit_jax.errors import GritJaxError
from grit_jax.fileio import write_json


def require_dir(path: str) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    hint = ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(path.split("/")[0]):  # a Hub id, not a path
      hint = (f" (grit_jax loads local directories only: `huggingface-cli download {path} --local-dir "
              f"~/{path.split('/')[1]}`, then pass that directory)")
    raise GritJaxError(f"{path}: no such directory{hint}")
  return path


def map_shapes(tree, fn):
  if isinstance(tree, dict):
    return {k: map_shapes(v, fn) for k, v in tree.items()}
  return fn(tree)


def open_safetensors(path: str):
  try:
    return safe_open(path, framework="np")
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged headers
    raise GritJaxError(f"{path}: unreadable safetensors file ({_first_line(e)})") from e


def get_tensor(handle, name: str, path: str) -> np.ndarray:
  try:
    return handle.get_tensor(name)
  except Exception as e:  # noqa: BLE001 - a truncated file fails here, past a valid header
    raise GritJaxError(f"{path}: tensor {name!r} is unreadable ({_first_line(e)}): the file is damaged") from e


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def require_finite(tensor: np.ndarray, what: str) -> None:
  """Weights with NaN or inf would train into NaN losses or serve NaN embeddings: refuse them by name."""
  if np.issubdtype(tensor.dtype, np.floating) or tensor.dtype.name == "bfloat16":
    bad = int(np.count_nonzero(~np.isfinite(tensor.astype(np.float32, copy=False))))
    if bad:
      raise GritJaxError(f"{what} has {bad} NaN/inf value(s) of {tensor.size}: the weights are damaged")


def numpy_dtype(name: str):
  import jax.numpy as jnp
  return jnp.dtype(name)  # numpy-compatible, bfloat16 included (ml_dtypes)


def parse_size(size) -> int:
  """Bytes from an int or a string like "5GB", "500MB" (powers of 1000, as HF)."""
  if isinstance(size, (int, np.integer)):
    return int(size)
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise GritJaxError(f"max_shard_size={size!r}: expected bytes or a size like '5GB'")
  unit = (m.group(2) or "B").upper()
  base = 1024 if "I" in unit else 1000
  return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def host(x) -> np.ndarray:
  return np.asarray(x)


def write_sorted_json(path: str, obj) -> None:
  write_json(path, obj, sort_keys=True)


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False):
  """Yields a temporary directory next to `dst`; on success it replaces `dst`, on error it is removed, so `dst`
  is never half-written."""
  dst = os.path.abspath(os.fspath(dst))
  if os.path.exists(dst) and not overwrite:
    raise GritJaxError(f"{dst}: already exists (pass --overwrite to replace it)")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
  os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: the result gets the user's umask like any new folder
  try:
    yield tmp
    old = None
    if os.path.exists(dst):
      old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=parent)
      os.replace(dst, os.path.join(old, "d"))
    os.replace(tmp, dst)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def save_safetensors(arrays, path: str, metadata: dict) -> None:
  save_file(arrays, path, metadata=metadata)
  os.chmod(path, 0o666 & ~_umask())  # safetensors creates its files 0600: give them the user's umask like the rest


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def flatten(params: dict, prefix: str = "") -> dict[str, object]:
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def unflatten(flat: dict[str, object]) -> dict:
  out: dict = {}
  for name, v in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out
