"""A corpus for `grit-jax index` / `mine`: JSONL files of {"id" (or BEIR's "_id"), "text", "title"?} rows, read
whole and checked before any model loads (every bad row and every id used twice is one line naming file:line)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from grit_jax.errors import GritJaxError


@dataclasses.dataclass
class CorpusFile:
  path: str
  ids: list[str]
  texts: list[str]
  offsets: list[int]  # byte offset of each row's line
  lines: list[int]    # its line number


def row_text(row: dict, where: str) -> tuple[str, str]:
  """(id, "title text") of one corpus row; a bad row is a GritJaxError naming `where`."""
  rid = row.get("id", row.get("_id"))
  if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
    raise GritJaxError(f"{where}: no 'id' (a string or an integer)")
  text, title = row.get("text"), row.get("title", "")
  if not isinstance(text, str) or not text.strip():
    raise GritJaxError(f"{where}: id {rid!r} has no text (a non-empty string 'text')")
  if not isinstance(title, str):
    raise GritJaxError(f"{where}: key 'title' must be a string")
  try:
    text.encode("utf-8"), title.encode("utf-8")
  except UnicodeEncodeError:  # JSON can spell half of a UTF-16 pair (\ud800); no tokenizer takes it
    raise GritJaxError(f"{where}: a lone UTF-16 surrogate in the text: not valid Unicode") from None
  return str(rid), (title + " " + text).strip() if title else text


def read_corpus_file(path: str) -> CorpusFile:
  """Every row of a corpus JSONL; a bad row is a GritJaxError naming the file and line."""
  out = CorpusFile(path, [], [], [], [])
  try:
    f = open(path, "rb")
  except OSError as e:
    raise GritJaxError(f"{path}: cannot open ({e.strerror})") from e
  with f:
    offset = 0
    for n, raw in enumerate(f, 1):
      start, offset = offset, offset + len(raw)
      if not raw.strip():
        continue
      try:
        row = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise GritJaxError(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from e
      except json.JSONDecodeError as e:
        raise GritJaxError(f"{path}:{n}: invalid JSON ({e.msg})") from e
      if not isinstance(row, dict):
        raise GritJaxError(f"{path}:{n}: expected an object with 'id' and 'text'")
      rid, text = row_text(row, f"{path}:{n}")
      out.ids.append(rid)
      out.texts.append(text)
      out.offsets.append(start)
      out.lines.append(n)
  if not out.ids:
    raise GritJaxError(f"{path}: no rows")
  return out


def read_corpus(paths: Sequence[str]) -> list[CorpusFile]:
  """All corpus files, with ids unique across them (a duplicate names both places)."""
  if not paths:
    raise GritJaxError("--corpus: no files")
  if len(set(map(os.path.abspath, paths))) != len(paths):
    raise GritJaxError(f"--corpus names a file twice: {list(paths)}")
  files, seen = [read_corpus_file(p) for p in paths], {}
  for cf in files:
    for rid, n in zip(cf.ids, cf.lines):
      if rid in seen:
        raise GritJaxError(f"{cf.path}:{n}: duplicate id {rid!r}, first at {seen[rid]}")
      seen[rid] = f"{cf.path}:{n}"
  return files
