"""A corpus for `grit-jax index` / `mine`: JSONL files of {"id" (or BEIR's "_id"), "text", "title"?} rows, read
whole and checked before any model loads (every bad row and every id used twice is one line naming file:line).
Only ids and row offsets stay in memory, as numpy arrays (per row 32 bytes, plus the UTF-8 length of an id longer
than 15 bytes: variable-width strings, so one long id does not widen every row); each shard's texts are read again
when it is encoded."""
from __future__ import annotations

import codecs
import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from grit_jax.errors import GritJaxError

IDS = np.dtypes.StringDType()  # variable-width str (a fixed-width "U" array is as wide as its longest id)
BLOCK_ROWS = 1 << 16  # rows gathered as Python objects before they become arrays (bounds that transient)


@dataclasses.dataclass
class CorpusFile:
  """A checked corpus file: its rows' ids and where each row is. The texts stay on disk (a corpus may be far larger
  than memory): `texts` reads a range of them again, for the shard being encoded."""
  path: str
  ids: np.ndarray      # [n] IDS
  offsets: np.ndarray  # [n] int64: byte offset of each row's line
  lines: np.ndarray    # [n] int64: its line number

  def texts(self, start: int, stop: int) -> list[str]:
    """The document_text of rows [start, stop); a row changed since the file was read is a GritJaxError naming
    its line."""
    out = []
    with open(self.path, "rb") as f:
      for n in range(start, stop):
        where, row = f"{self.path}:{self.lines[n]}", row_at(f, self.offsets[n])
        rid, text = row_text(row, where) if isinstance(row, dict) else (None, None)
        if rid != self.ids[n]:
          raise GritJaxError(f"{where}: the row changed since the corpus was read (id {self.ids[n]!r}): rerun")
        out.append(text)
    return out


@dataclasses.dataclass(frozen=True)
class PackedIds:
  """Ids as Arrow lays out strings, what an index and its shards store: their UTF-8 bytes end to end and N + 1
  offsets. An id costs its own bytes (the .npy format's fixed-width str is as wide as the longest id, for every
  row), and both arrays memory-map: a search reads the ids of its hits only."""
  utf8: np.ndarray     # [total bytes] uint8
  offsets: np.ndarray  # [N + 1] int64

  @classmethod
  def of(cls, ids) -> "PackedIds":
    encoded = [str(i).encode("utf-8") for i in ids]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    return cls(np.frombuffer(b"".join(encoded), np.uint8), offsets)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> str:
    i = range(len(self))[i]  # negative and out-of-range indices as a list's
    return self.utf8[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __eq__(self, other) -> bool:
    return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.utf8, other.utf8)

  def arrays(self, prefix: str = "ids") -> dict[str, np.ndarray]:
    """{prefix_utf8, prefix_offsets}: how np.savez stores them."""
    return {f"{prefix}_utf8": self.utf8, f"{prefix}_offsets": self.offsets}

  @classmethod
  def check(cls, utf8: np.ndarray, offsets: np.ndarray, where: str) -> "PackedIds":
    """Read back: a GritJaxError naming `where` unless the offsets run from 0 to the byte count (the sha256s
    recorded beside them catch the rest)."""
    if not (utf8.dtype == np.uint8 and offsets.dtype == np.int64 and offsets.ndim == utf8.ndim == 1 and
            len(offsets) and offsets[0] == 0 and offsets[-1] == len(utf8)):
      raise GritJaxError(f"{where}: the ids' bytes and offsets disagree (damaged)")
    return cls(utf8, offsets)


def row_at(f, offset: int):
  """The JSON value of the line at byte `offset` of the open (binary) corpus file `f`; None if it is not JSON."""
  f.seek(offset)
  try:
    return json.loads(f.readline().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None


def document_text(doc: dict, where: str) -> str:
  """The one rule for a document that may have a title (a corpus row, an encode_corpus dict, a RAG document):
  "title text" as gritlm's encode_corpus joins them, the text alone when the row has no "title" key. As there, an
  empty title still gives " text", so a BEIR corpus (empty titles included) embeds as in the reference."""
  text = doc.get("text")
  if not isinstance(text, str):
    raise GritJaxError(f"{where}: expected a string 'text'")
  if "title" not in doc:
    return text
  if not isinstance(doc["title"], str):
    raise GritJaxError(f"{where}: key 'title' must be a string")
  return doc["title"] + " " + text


def row_text(row: dict, where: str) -> tuple[str, str]:
  """(id, its document_text) of one corpus row; a bad row is a GritJaxError naming `where`."""
  rid = row.get("id", row.get("_id"))
  if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
    raise GritJaxError(f"{where}: no 'id' (a string or an integer)")
  if not isinstance(row.get("text"), str) or not row["text"].strip():
    raise GritJaxError(f"{where}: id {rid!r} has no text (a non-empty string 'text')")
  text = document_text(row, where)
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # JSON can spell half of a UTF-16 pair (\ud800); no tokenizer takes it
    raise GritJaxError(f"{where}: a lone UTF-16 surrogate in the text: not valid Unicode") from None
  return str(rid), text


def read_corpus_file(path: str) -> CorpusFile:
  """Every row of a corpus JSONL; a bad row is a GritJaxError naming the file and line."""
  blocks, ids, offsets, lines = [], [], [], []

  def flush():
    if ids:
      blocks.append((np.asarray(ids, dtype=IDS), np.asarray(offsets, np.int64), np.asarray(lines, np.int64)))
      ids.clear(), offsets.clear(), lines.clear()

  try:
    f = open(path, "rb")
  except OSError as e:
    raise GritJaxError(f"{path}: cannot open ({e.strerror})") from e
  with f:
    offset = 0
    for n, raw in enumerate(f, 1):
      start, offset = offset, offset + len(raw)
      if n == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte-order mark is not part of row 1 (as jsonl.py reads)
        raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
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
      rid, _ = row_text(row, f"{path}:{n}")
      ids.append(rid)
      offsets.append(start)
      lines.append(n)
      if len(ids) == BLOCK_ROWS:
        flush()
  flush()
  if not blocks:
    raise GritJaxError(f"{path}: no rows")
  return CorpusFile(path, *(np.concatenate(parts) for parts in zip(*blocks)))


def read_corpus(paths: Sequence[str]) -> list[CorpusFile]:
  """All corpus files, with ids unique across them (a duplicate names both places)."""
  if not paths:
    raise GritJaxError("--corpus: no files")
  if len(set(map(os.path.abspath, paths))) != len(paths):
    raise GritJaxError(f"--corpus names a file twice: {list(paths)}")
  files = [read_corpus_file(p) for p in paths]
  ids = np.concatenate([cf.ids for cf in files])
  order = np.argsort(ids, kind="stable")  # equal ids side by side, each run in corpus order
  sorted_ids = ids[order]
  repeats = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1]) + 1  # sorted positions of every later use
  if repeats.size:  # name the one met first in corpus order, and where that id was first used
    later = repeats[np.argmin(order[repeats])]
    first = np.searchsorted(sorted_ids, sorted_ids[later], side="left")
    ends = np.cumsum([len(cf.ids) for cf in files])

    def at(r):  # a row of the whole corpus -> "file:line"
      f = int(np.searchsorted(ends, r, side="right"))
      return f"{files[f].path}:{files[f].lines[r - (ends[f - 1] if f else 0)]}"
    raise GritJaxError(f"{at(order[later])}: duplicate id {sorted_ids[later]!r}, first at {at(order[first])}")
  return files
