"""Reading and validating the GritLM JSONL formats, with the bad-input policy.

A folder holds one JSONL file per dataset (sorted by name; `*.jsonl`); anything else in it is named in a warning
(a README is common; a `data.jsonl.gz` is not read). Embedding files have a "query" key, generative files a "text"
key; a file's kind is decided by its first line that parses as an object with one of them. A line with both keys
is an error whatever the policy: which kind it is cannot be guessed.

- Embedding: `{"query": [instr, text] | text, "pos": [[instr, text] | text, ...], "neg": [...]}`, optionally with
  a teacher's scores of every candidate, `"pos_scores": [float, ...], "neg_scores": [...]` (FlagEmbedding's keys;
  one per pos / neg text, in order; config.loss.distill_weight); a file has them on every row or on none
- Generative: `{"text": [user, assistant, user, assistant, ...] | text}`

Every problem names the file and line: `path:LINE: what`. Policy "error" raises GritJaxError at the first one;
"skip" drops the line, counts it per file and keeps the first messages, so nothing disappears silently.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
from typing import Any, Callable, Iterator

from grit_jax.data import templates
from grit_jax.errors import GritJaxError

EMBEDDING = "embedding"
GENERATIVE = "generative"
POLICIES = ("skip", "error")
MAX_MESSAGES_PER_FILE = 20


class BadLine(GritJaxError):
  """A problem with one JSON line (the reader adds file and line)."""


@dataclasses.dataclass
class BadInputStats:
  """Skipped lines per file (skip policy), with the first messages of each file; and rows that repeat an earlier
  row of their file (kept, counted: in one batch they would be each other's false negatives)."""
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  messages: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  duplicates: dict[str, int] = dataclasses.field(default_factory=dict)
  duplicate_messages: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def add(self, path: str, message: str) -> None:
    self.skipped[path] = self.skipped.get(path, 0) + 1
    msgs = self.messages.setdefault(path, [])
    if len(msgs) < MAX_MESSAGES_PER_FILE:
      msgs.append(message)

  def add_duplicate(self, path: str, message: str) -> None:
    self.duplicates[path] = self.duplicates.get(path, 0) + 1
    msgs = self.duplicate_messages.setdefault(path, [])
    if len(msgs) < MAX_MESSAGES_PER_FILE:
      msgs.append(message)

  def merge(self, other: "BadInputStats") -> None:
    for path, n in other.skipped.items():
      self.skipped[path] = self.skipped.get(path, 0) + n
      self.messages.setdefault(path, []).extend(other.messages.get(path, [])[:MAX_MESSAGES_PER_FILE])
    for path, n in other.duplicates.items():
      self.duplicates[path] = self.duplicates.get(path, 0) + n
      self.duplicate_messages.setdefault(path, []).extend(
          other.duplicate_messages.get(path, [])[:MAX_MESSAGES_PER_FILE])

  @property
  def total(self) -> int:
    return sum(self.skipped.values())

  @property
  def total_duplicates(self) -> int:
    return sum(self.duplicates.values())

  def to_json(self) -> dict:
    return {"skipped": dict(self.skipped), "messages": {k: list(v) for k, v in self.messages.items()},
            "duplicates": dict(self.duplicates),
            "duplicate_messages": {k: list(v) for k, v in self.duplicate_messages.items()}}

  @classmethod
  def from_json(cls, d: dict | None) -> "BadInputStats":
    d = d or {}
    return cls(dict(d.get("skipped", {})), {k: list(v) for k, v in d.get("messages", {}).items()},
               dict(d.get("duplicates", {})), {k: list(v) for k, v in d.get("duplicate_messages", {}).items()})

  def report(self) -> str:
    lines = [f"bad input: skipped {self.total} line(s)" if self.skipped else "bad input: no lines skipped"]
    for path, n in sorted(self.skipped.items()):
      lines.append(f"  {path}: {n} skipped")
      lines += [f"    {m}" for m in self.messages.get(path, [])]
    if self.duplicates:
      lines.append(f"duplicate rows: {self.total_duplicates} row(s) repeat an earlier row of their file (kept; two "
                   "queries of one batch with the same positive are not each other's negatives)")
    for path, n in sorted(self.duplicates.items()):
      lines.append(f"  {path}: {n} duplicate(s)")
      lines += [f"    {m}" for m in self.duplicate_messages.get(path, [])]
    return "\n".join(lines)


_WARNED: set[str] = set()  # folders whose extra entries this process has named (evaluation lists them again)


def list_jsonl(folder: str) -> list[str]:
  """The folder's *.jsonl files, sorted; other entries are named in a warning (an error when no *.jsonl is left)."""
  if not os.path.isdir(folder):
    raise GritJaxError(f"data folder {folder!r} does not exist")
  files = sorted(glob.glob(os.path.join(folder, "*.jsonl")))
  for f in files:  # opened later by name: say now what is wrong with them
    if os.path.isdir(f):
      raise GritJaxError(f"{f}: a folder named *.jsonl in the data folder (a data file must be a file; rename it)")
    if not os.path.exists(f):
      raise GritJaxError(f"{f}: a dangling symbolic link (its target {os.readlink(f)} does not exist)")
  others = sorted(set(os.listdir(folder)) - {os.path.basename(f) for f in files})
  if not files:
    found = f" (it has: {', '.join(others[:10])}{' ...' if len(others) > 10 else ''})" if others else ""
    raise GritJaxError(f"data folder {folder!r} has no *.jsonl files{found}")
  if others and folder not in _WARNED:
    _WARNED.add(folder)
    logging.warning("data folder %s: ignoring %d entr%s that %s not *.jsonl: %s", folder, len(others),
                    "y" if len(others) == 1 else "ies", "is" if len(others) == 1 else "are", ", ".join(others))
  return files


def file_kind(path: str) -> str | None:
  """EMBEDDING, GENERATIVE, or None when no line is an object with "query" or "text"."""
  with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: a byte-order mark is not part of line 1
    for lineno, line in enumerate(f, 1):
      try:
        obj = json.loads(line)
      except ValueError:
        continue
      if isinstance(obj, dict):
        _check_one_kind(obj, path, lineno)
        if "query" in obj:
          return EMBEDDING
        if "text" in obj:
          return GENERATIVE
  return None


def has_teacher_scores(path: str) -> bool:
  """Whether the embedding file's first row carries teacher scores (a file has them on every row or on none: the
  build checks the rest)."""
  with open(path, encoding="utf-8-sig", errors="replace") as f:
    for line in f:
      try:
        obj = json.loads(line)
      except ValueError:
        continue
      if isinstance(obj, dict) and "query" in obj:
        return "pos_scores" in obj or "neg_scores" in obj
  return False


def split_files(folder: str) -> dict[str, list[str]]:
  """{kind: files} of a folder; a file with neither key is an error (it would otherwise be ignored silently)."""
  out = {EMBEDDING: [], GENERATIVE: []}
  for path in list_jsonl(folder):
    kind = file_kind(path)
    if kind is None:
      raise GritJaxError(f"{path}: no line has a \"query\" (embedding) or \"text\" (generative) key")
    out[kind].append(path)
  return out


def _check_one_kind(obj: dict, path: str, lineno: int) -> None:
  if "query" in obj and "text" in obj:
    raise GritJaxError(f'{path}:{lineno}: has both "query" (embedding) and "text" (generative) keys; a line is one '
                       "or the other")


def _pair(value: Any, key: str) -> tuple[str, str]:
  """(instruction, text) of `[instr, text]` or a plain string."""
  if isinstance(value, str):
    instr, text = "", value
  elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value):
    instr, text = value
  else:
    raise BadLine(f"{key}: expected [instruction, text] or a string, got {json.dumps(value)[:80]}")
  if not text.strip():
    raise BadLine(f"{key}: empty text")
  return instr, text


def parse_embedding(obj: Any, group_size: int) -> dict:
  """{"query": (instr, text), "pos": [(instr, text)], "neg": [(instr, text)]}; raises BadLine."""
  if not isinstance(obj, dict):
    raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
  keys = ("query", "pos", "neg") if group_size > 1 else ("query", "pos")
  for key in keys:
    if key not in obj:
      raise BadLine(f"missing key {key!r}")
  out = {"query": _pair(obj["query"], "query")}
  for key in ("pos", "neg"):
    items = obj.get(key, [])
    if not isinstance(items, list):
      raise BadLine(f"{key}: expected a list")
    out[key] = [_pair(v, f"{key}[{i}]") for i, v in enumerate(items)]
  if not out["pos"]:
    raise BadLine("pos: empty list")
  if group_size > 1 and not out["neg"]:
    raise BadLine(f"neg: empty list, but train_group_size={group_size} needs hard negatives")
  if "pos_scores" in obj or "neg_scores" in obj:
    for key, texts in (("pos_scores", "pos"), ("neg_scores", "neg")):
      scores = obj.get(key, [] if not out[texts] else None)
      if scores is None:
        raise BadLine(f"{key}: missing, but the row has {'pos_scores' if key == 'neg_scores' else 'neg_scores'} "
                      "(a teacher scores every candidate)")
      if not isinstance(scores, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 and math.isfinite(v) for v in scores):
        raise BadLine(f"{key}: expected a list of finite numbers")
      if len(scores) != len(out[texts]):
        raise BadLine(f"{key}: {len(scores)} score(s) for {len(out[texts])} {texts} text(s)")
      out[key] = [float(v) for v in scores]
  return out


def parse_generative(obj: Any) -> dict:
  """{"turns": [user, assistant, ...], "chat": bool}; a trailing user turn is dropped (as the reference)."""
  if not isinstance(obj, dict):
    raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
  if "text" not in obj:
    raise BadLine("missing key 'text'")
  text = obj["text"]
  if isinstance(text, str):
    if not text.strip():
      raise BadLine("text: empty text")
    return {"turns": [text], "chat": False}
  if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
    raise BadLine("text: expected a string or a list of strings [user, assistant, ...]")
  turns = templates.normalize_turns(text)
  if not turns:
    raise BadLine("text: no complete (user, assistant) turn")
  for i, t in enumerate(turns):
    if not t.strip():
      raise BadLine(f"text[{i}]: empty text")
  return {"turns": turns, "chat": True}


def read_file(path: str, kind: str, *, policy: str, stats: BadInputStats, group_size: int = 2,
              check: Callable[[dict], None] | None = None) -> Iterator[tuple[int, dict]]:
  """Yields (1-based line number, parsed record) of the valid lines of `path`.

  check: an extra per-record validation (e.g. token lengths) that raises GritJaxError for a bad record.
  """
  for lineno, _, record in read_objects(path, kind, policy=policy, stats=stats, group_size=group_size, check=check):
    yield lineno, record


def read_objects(path: str, kind: str, *, policy: str, stats: BadInputStats, group_size: int = 2,
                 check: Callable[[dict], None] | None = None) -> Iterator[tuple[int, Any, dict]]:
  """As read_file, with each line's JSON object as written (for tools that rewrite rows, e.g. `grit-jax mine`)."""
  if policy not in POLICIES:
    raise GritJaxError(f"config.data.bad_input={policy!r}: expected one of {POLICIES}")
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark would break line 1's JSON
      except UnicodeDecodeError as e:
        _bad(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})", policy, stats)
        continue
      if not line.strip():
        continue  # blank lines carry no data
      try:
        obj = json.loads(line)
      except ValueError as e:
        _bad(path, lineno, f"malformed JSON ({getattr(e, 'msg', e)})", policy, stats)
        continue
      if isinstance(obj, dict):
        _check_one_kind(obj, path, lineno)
      if _SURROGATE_ESCAPE.search(line) and not _is_unicode(obj):
        _bad(path, lineno, "a lone UTF-16 surrogate escape (\\ud800-\\udfff) in a text: not valid Unicode", policy,
             stats)
        continue
      try:
        record = parse_embedding(obj, group_size) if kind == EMBEDDING else parse_generative(obj)
        if check is not None:
          check(record)
      except GritJaxError as e:
        _bad(path, lineno, str(e), policy, stats)
        continue
      yield lineno, obj, record


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # JSON can spell half of a UTF-16 pair


def _is_unicode(obj: Any) -> bool:
  """No lone surrogate in any string of obj (a pair of escapes decodes to one character and is fine)."""
  try:
    json.dumps(obj, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _bad(path: str, lineno: int, what: str, policy: str, stats: BadInputStats) -> None:
  message = f"{path}:{lineno}: {what}"
  if policy == "error":
    raise GritJaxError(message)
  logging.warning("skipping bad input line: %s", message)
  stats.add(path, message)
