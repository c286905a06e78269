"""Rebuilds the shipped sample data and tokenizer deterministically from the Python standard library's docstrings.

    .venv/bin/python data/build_data.py            # writes data/train/*.jsonl, data/eval/*.jsonl, data/tokenizer.model

Everything comes from the docstrings of the running interpreter's standard library (PSF license), so the output
depends only on the Python version (recorded in data/README.md). Files are written atomically.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_DOC_CHARS = 1200

# One embedding dataset per module group (so "each batch from one dataset" sampling matters); the instruction
# differs per dataset, as in MEDI / E5 where every source has its own task instruction.
GROUPS = {
    "docs_text": (["string", "textwrap", "difflib", "json", "html", "base64", "shlex", "re", "codecs",
                   "unicodedata", "email.utils", "urllib.parse"],
                  "summary", "Given a one-line summary, retrieve the Python function documentation"),
    "docs_files": (["os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "zipfile", "tarfile", "filecmp",
                    "io", "os"],
                   "name", "Given the name of a Python function, retrieve its documentation"),
    "docs_algorithms": (["collections", "itertools", "functools", "heapq", "bisect", "math", "statistics", "random",
                         "operator", "copy", "array", "datetime", "fractions", "decimal"],
                        "summary", "Given a one-line summary, retrieve the Python function documentation"),
}
MAX_PER_GROUP = 130


def _functions(module_names):
  """(qualified name, docstring) of documented public callables whose docstring has a summary and a body."""
  out, seen = [], set()
  for m in module_names:
    mod = importlib.import_module(m)
    for name, obj in sorted(vars(mod).items()):
      if name.startswith("_") or not callable(obj) or inspect.isclass(obj) and issubclass(obj, BaseException):
        continue
      if getattr(obj, "__module__", None) not in (m, None) and not m.startswith("os"):
        continue
      doc = inspect.getdoc(obj)
      if not doc or doc in seen:
        continue
      lines = [l for l in doc.split("\n") if l.strip()]
      if len(lines) < 2 or len(lines[0]) < 12:
        continue
      seen.add(doc)
      out.append((f"{m}.{name}", doc[:MAX_DOC_CHARS].rstrip()))
  return out


def _summary(doc: str) -> str:
  return doc.split("\n")[0].strip()


def _held_out(name: str) -> bool:
  """Deterministic 10% hold-out by name hash (independent of module iteration order)."""
  return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0


def _write_jsonl(path: str, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def build_rows():
  """{relative path: rows}."""
  files = {}
  chat_train, chat_eval = [], []
  eval_emb = []
  for dataset, (modules, query_kind, instruction) in GROUPS.items():
    funcs = _functions(modules)[:MAX_PER_GROUP]
    rows = []
    for i, (name, doc) in enumerate(funcs):
      # Hard negative: the neighbouring function's documentation (same module group, adjacent name).
      neighbour = funcs[i + 1 if i + 1 < len(funcs) else i - 1]
      query = _summary(doc) if query_kind == "summary" else name
      row = {"query": [instruction, query], "pos": [["", f"{name}\n{doc}"]],
             "neg": [["", f"{neighbour[0]}\n{neighbour[1]}"]]}
      (eval_emb if _held_out(name) else rows).append(row)
      # Generative: "what does X do" -> its summary; every third one continues with a second turn.
      turns = [f"What does {name} do?", _summary(doc)]
      if i % 3 == 0:
        turns += ["Which module is it in?", f"{name.rsplit('.', 1)[1]} is in the {name.rsplit('.', 1)[0]} module."]
      elif i % 3 == 1:
        turns += [f"And {neighbour[0]}?", _summary(neighbour[1])]
      (chat_eval if _held_out(name) else chat_train).append({"text": turns})
    files[f"train/{dataset}.jsonl"] = rows
  files["train/chat.jsonl"] = chat_train
  files["eval/docs_eval.jsonl"] = eval_emb
  files["eval/chat_eval.jsonl"] = chat_eval
  return files


def _tokenizer_sentences(files):
  """Every text the model will see, rendered in the GritLM templates, one line per sentence (SentencePiece reads
  line by line, so no learned piece contains "\\n": it stays a byte-fallback token, which keeps template span
  boundaries exact)."""
  sys.path.insert(0, os.path.dirname(HERE))
  from grit_jax.data import templates

  for rows in files.values():
    for r in rows:
      if "query" in r:
        texts = [templates.embed_text(*r["query"])] + [templates.embed_text(*p) for p in r["pos"] + r["neg"]]
      else:
        texts = [templates.chat_text(r["text"])]
      for t in texts:
        for line in t.split("\n"):
          if line.strip():
            yield line


def train_tokenizer(files, out_path: str) -> None:
  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(_tokenizer_sentences(files))), model_writer=model,
      model_type="bpe", vocab_size=1000,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Mistral's layout
      byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
      input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out_path), suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(model.getvalue())
  os.chmod(tmp, 0o644)
  os.replace(tmp, out_path)


def main() -> int:
  files = build_rows()
  for rel, rows in files.items():
    _write_jsonl(os.path.join(HERE, rel), rows)
    print(f"{rel}: {len(rows)} rows")
  train_tokenizer(files, os.path.join(HERE, "tokenizer.model"))
  print(f"tokenizer.model: 1000 pieces (Python {sys.version.split()[0]})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
