"""The checksums of a checkpoint step: `<step>/grit_checksums.json`, the size and sha256 of every file of the step
(orbax's own commit markers aside), written before orbax commits the step and verified before it is restored."""
from __future__ import annotations

import hashlib
import json
import os

from etils import epath

from grit_jax.fileio import write_json
from grit_jax.training.run_folders import is_local, one_line

MANIFEST = "grit_checksums.json"
# Written by orbax at the commit, after the checksums: not covered.
_UNCOVERED = ("_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST)


def _covered_files(step_dir: epath.Path) -> list[str]:
  """Relative paths of the files a manifest covers, sorted."""
  out, todo = [], [step_dir]
  while todo:  # (epath has no recursive glob on object stores)
    for p in todo.pop().iterdir():
      if p.is_dir():
        todo.append(p)
      elif p.name not in _UNCOVERED:
        out.append(str(p.relative_to(step_dir)))
  return sorted(out)


def _sha256(path: epath.Path) -> tuple[int, str]:
  h, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
      size += len(chunk)
  return size, h.hexdigest()


def write_manifest(step_dir: str) -> None:
  """Writes `<step_dir>/grit_checksums.json`: {relative path: [size, sha256]} of every covered file."""
  d = epath.Path(step_dir)
  manifest = {"format": 1, "files": {rel: list(_sha256(d / rel)) for rel in _covered_files(d)}}
  if is_local(step_dir):
    write_json(os.path.join(step_dir, MANIFEST), manifest, indent=1)
  else:  # object stores write an object atomically
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify_manifest(step_dir: str, shard: int = 0, num_shards: int = 1) -> str | None:
  """None when this shard (files [shard::num_shards]) of the step's files matches its manifest, else what differs
  (the first problem). A step without a manifest is reported by the caller."""
  d = epath.Path(step_dir)
  try:
    files = json.loads((d / MANIFEST).read_text())["files"]
  except (ValueError, KeyError, TypeError) as e:
    return f"{MANIFEST} is unreadable ({one_line(e)})"
  for rel in sorted(files)[shard::num_shards]:
    size, digest = files[rel]
    p = d / rel
    if not p.exists():
      return f"{rel} is missing"
    got_size, got_digest = _sha256(p)
    if got_size != size:
      return f"{rel} has {got_size} bytes, {size} were written (truncated or overwritten)"
    if got_digest != digest:
      return f"{rel} does not match its sha256 (corrupted bytes)"
  return None
