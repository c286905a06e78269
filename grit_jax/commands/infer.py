"""`grit-jax embed | generate | rag`: thin command-line front ends over grit_jax.inference.

  grit-jax embed    --model DIR --input texts.jsonl --output emb.npy [--instruction "..."]
  grit-jax generate --model DIR --prompt "..." [--prompt "..."] [--max-new-tokens N --temperature T --top-p P]
  grit-jax rag      --model DIR --corpus docs.jsonl --query "..." --cache doc [--index DIR]

JSONL rows are a JSON string or an object with "text" (and optionally "title"). Bad input raises GritJaxError
naming the file and line, before the model is loaded; outputs are checked first and written to a temporary name
and renamed, so nothing half-written remains. Attention, pooling, normalisation and max length default to the
model's grit_settings.json (max length: the model's one embedding max length, inference.gritlm.GritLM.max_length);
a flag given explicitly overrides it (logged). Texts cut to the max length are reported once per command.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np

from grit_jax import common_types
from grit_jax.data.corpus import document_text
from grit_jax.errors import GritJaxError
from grit_jax.fileio import atomic_write, read_json

log = logging.getLogger(__name__)


def read_texts(path: str) -> list:
  """Rows of a JSONL file: strings, or {"text": ..., "title": ...} objects (data.corpus.document_text)."""
  try:
    f = open(path, "rb")
  except OSError as e:
    raise GritJaxError(f"{path}: cannot open ({e.strerror})") from e
  rows = []
  with f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise GritJaxError(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from e
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise GritJaxError(f"{path}:{n}: invalid JSON ({e.msg})") from e
      if isinstance(row, dict) and isinstance(row.get("text"), str):
        text = document_text(row, f"{path}:{n}")
      elif isinstance(row, str):
        text = row
      else:
        raise GritJaxError(f"{path}:{n}: expected a JSON string or an object with a string 'text' key")
      if not text.strip():
        raise GritJaxError(f"{path}:{n}: empty text")
      try:
        text.encode("utf-8")
      except UnicodeEncodeError:  # JSON can spell half of a UTF-16 pair (\ud800); no tokenizer takes it
        raise GritJaxError(f"{path}:{n}: a lone UTF-16 surrogate in the text: not valid Unicode") from None
      rows.append(text)
  if not rows:
    raise GritJaxError(f"{path}: no texts")
  return rows


def check_output_file(path: str, flag: str, suffix: str = "") -> None:
  """A file we may (re)write: not a directory, in an existing writable folder; checked before any work."""
  if os.path.isdir(path):
    raise GritJaxError(f"{flag} {path}: is a directory")
  if suffix and not path.endswith(suffix):
    raise GritJaxError(f"{flag} {path}: expected a {suffix} path")
  check_writable_folder(os.path.dirname(os.path.abspath(path)), flag, path)
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise GritJaxError(f"{flag} {path}: exists and is not writable")


def check_writable_folder(folder: str, flag: str, path: str) -> None:
  if not os.path.isdir(folder):
    raise GritJaxError(f"{flag} {path}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise GritJaxError(f"{flag} {path}: folder {folder} is not writable")


def save_npy_atomic(path: str, array: np.ndarray) -> None:
  check_output_file(path, "--output", ".npy")
  atomic_write(path, lambda f: np.save(f, array), "wb")


def model_config(path: str):
  """The model's config (config.json only, no weights): for checks before loading. A GGUF file is checked and
  converted here (once: convert.gguf.model_dir caches it), so a bad file fails before anything else."""
  from grit_jax.convert import gguf, hf
  from grit_jax.modeling.config import ModelConfig
  if gguf.is_gguf(path):
    path = gguf.model_dir(path)
  if not os.path.isdir(path):
    raise GritJaxError(f"--model {path}: not a directory (a model directory or a GGUF file)")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise GritJaxError(f"--model {path}: no config.json")
  if hf.is_jax_dir(path):
    return ModelConfig.from_dict(read_json(os.path.join(path, "config.json"), "the model config")["model"],
                                 source=os.path.join(path, "config.json"))
  return ModelConfig.from_hf(path)


def _load(path: str, attn: str | None = None, shard_weights: bool | None = None):
  from grit_jax.inference.gritlm import GritLM
  model_config(path)
  kwargs = {} if attn is None else {"attn": attn}
  return GritLM.from_pretrained(path, shard_weights=shard_weights, **kwargs)


class _Help(argparse.HelpFormatter):
  """Every option's help ends with its default (or says it is required / where its default comes from)."""

  def _get_help_string(self, action):
    text = action.help or ""
    if action.required:
      return text + " (required)"
    if action.default in (None, argparse.SUPPRESS) or "default" in text:
      return text
    return f"{text} (default: {action.default!r})"


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Help)
  p.add_argument("--model", required=True, help="model directory (Hugging Face or grit_jax format)")
  return p


def _add_attn(p: argparse.ArgumentParser) -> None:
  p.add_argument("--attn", default=None, choices=common_types.SERVED_ATTNS,
                 help="attention of the embedding passes (chars 1-2: b bidirectional, c causal); "
                      "default: the model's grit_settings.json, else bbcc")


def add_shard_weights(p: argparse.ArgumentParser) -> None:
  p.add_argument("--shard-weights", default=None, action=argparse.BooleanOptionalAction,
                 help="shard the weights over the local devices (FSDP) or replicate them; default: shard when they "
                      "exceed half of one device's memory")


def add_packing(p: argparse.ArgumentParser) -> None:
  p.add_argument("--packing", default=None, action=argparse.BooleanOptionalAction,
                 help="pack whole texts into fixed-length rows (same embeddings as padded batches); default: packed "
                      "the texts and row length that cost fewer FLOPs than padding (inference.encode.choose_row_len)")


def add_dim(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dim", type=_positive("--dim"), default=None,
                 help="keep the first DIM components, re-normalised (Matryoshka; the model's trained dims are its "
                      "grit_settings.json's matryoshka_dims); default: all")


def check_dim(dim: int | None, model_dir: str) -> None:
  """--dim against the model's hidden size, from its config.json (before the weights load)."""
  if dim is not None and dim > model_config(model_dir).hidden_size:
    raise GritJaxError(f"--dim {dim}: larger than the model's hidden size {model_config(model_dir).hidden_size}")


def add_max_length(p: argparse.ArgumentParser, what: str = "text") -> None:
  p.add_argument("--max-length", type=_positive("--max-length"), default=None,
                 help=f"max tokens per {what} (template included); default: the model's embedding max length "
                      "(the longer of its trained query / passage lengths in grit_settings.json, else 512)")


def _positive(name: str):
  def parse(s: str) -> int:
    try:
      v = int(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}")
    if v < 1:
      raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
    return v
  return parse


def _check_new_tokens(model_dir: str, max_new_tokens: int) -> None:
  limit = model_config(model_dir).max_position_embeddings
  if max_new_tokens >= limit:
    raise GritJaxError(f"--max-new-tokens {max_new_tokens}: the model has {limit} positions (prompt included)")


def embed_main(argv: list[str]) -> int:
  p = _parser("grit-jax embed", "Embed a JSONL of texts into a .npy matrix.")
  p.add_argument("--input", required=True, help="JSONL: one string or {'text': ...} per line")
  p.add_argument("--output", required=True, help=".npy file, float32 [N, D] (written atomically)")
  p.add_argument("--instruction", default="", help="task instruction (plain, or gritlm's wrapped form)")
  p.add_argument("--batch-size", type=_positive("--batch-size"), default=64, help="texts per forward pass")
  add_max_length(p)
  add_dim(p)
  p.add_argument("--pooling", default=None, choices=common_types.POOLINGS,
                 help="default: the model's grit_settings.json, else mean")
  p.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction,
                 help="L2-normalise the embeddings; default: the model's grit_settings.json, else yes")
  _add_attn(p)
  add_packing(p)
  add_shard_weights(p)
  a = p.parse_args(argv)
  check_output_file(a.output, "--output", ".npy")
  texts = read_texts(a.input)
  check_dim(a.dim, a.model)
  model = _load(a.model, a.attn, a.shard_weights)
  emb = model.encode(texts, instruction=a.instruction, batch_size=a.batch_size, max_length=a.max_length,
                     pooling=a.pooling, normalize=a.normalize, packing=a.packing, dim=a.dim)
  save_npy_atomic(a.output, emb)
  print(f"wrote {a.output}: {emb.shape[0]} x {emb.shape[1]} float32")
  return 0


def generate_main(argv: list[str]) -> int:
  p = _parser("grit-jax generate", "Generate chat replies.")
  p.add_argument("--prompt", required=True, action="append", help="a user message (repeat for a batch)")
  p.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=256,
                 help="stop after this many tokens (or at </s>)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  add_shard_weights(p)
  a = p.parse_args(argv)
  from grit_jax.inference.generate import check_sampling
  check_sampling(a.temperature, a.top_p, names=("--temperature", "--top-p"))  # before loading the model
  _check_new_tokens(a.model, a.max_new_tokens)
  model = _load(a.model, shard_weights=a.shard_weights)
  outs = model.generate(a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                        seed=a.seed)
  for prompt, out in zip(a.prompt, outs):
    print(out if len(outs) == 1 else f"### {prompt}\n{out}\n")
  return 0


def rag_main(argv: list[str]) -> int:
  from grit_jax.inference import rag as rag_lib
  from grit_jax.inference import rag_index
  p = _parser("grit-jax rag", "Retrieve from a corpus and answer (KV caching).")
  p.add_argument("--corpus", help="JSONL of documents (string or {'title', 'text'}); not needed with an --index")
  p.add_argument("--query", required=True, action="append", help="a question (repeat for a batch)")
  p.add_argument("--cache", default="doc", choices=rag_lib.MODES, help="caching mode (GritLM paper section 4)")
  p.add_argument("--index", help="index folder: reused when it was built by this model from this --corpus, "
                                 "rebuilt when --corpus or the model changed, else built and saved there")
  p.add_argument("--prompt", default="query", choices=tuple(rag_lib.FULL_PROMPTS),
                 help="plain-RAG prompt format (--cache none)")
  p.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=16, help="answer length limit")
  add_max_length(p, "document / query embedding pass")
  _add_attn(p)
  add_shard_weights(p)
  p.add_argument("--doc-cache", default=None,
                 help="with a corpus index (`grit-jax index`): folder where the retrieved documents' KV caches are "
                      "kept and reused (doc modes); default: computed per call")
  a = p.parse_args(argv)
  from grit_jax.inference import corpus_index
  if a.index and corpus_index.CorpusIndex.exists(a.index):
    return _rag_corpus_index(a)
  if a.doc_cache:
    raise GritJaxError("--doc-cache needs --index naming a corpus index built by `grit-jax index`")
  if a.index and os.path.exists(a.index) and not os.path.isdir(a.index):
    raise GritJaxError(f"--index {a.index}: exists and is not a directory")
  if a.index and not os.path.exists(a.index):
    check_writable_folder(os.path.dirname(os.path.abspath(a.index)), "--index", a.index)
  have_index = bool(a.index) and rag_index.RagIndex.exists(a.index)
  if not a.corpus and not have_index:
    raise GritJaxError("--corpus is required unless --index names an existing index")
  docs = read_texts(a.corpus) if a.corpus else None
  _check_new_tokens(a.model, a.max_new_tokens)
  index = rag_index.RagIndex.load(a.index) if have_index else None  # damaged files: named errors before loading
  model = _load(a.model, a.attn, a.shard_weights)
  if index is not None:
    stale = None
    if docs is not None and index.corpus != rag_index.corpus_fingerprint(docs):
      stale = f"--corpus {a.corpus} differs from the corpus it was built from"
    elif docs is not None and index.causal != model.attn_mode.embedding_causal:
      stale = f"it was built with causal={index.causal} embedding passes, --attn {model.attn} differs"
    else:
      try:
        index.check_model(model, f"--index {a.index}")
      except GritJaxError as e:
        if docs is None:
          raise
        stale = str(e)
    if stale:
      log.warning("--index %s: %s; rebuilding it", a.index, stale)
      index = None
  if index is None:
    index = rag_index.build_index(model, docs, max_length=a.max_length,
                                with_cache=a.cache in ("doc", "doc_query") or bool(a.index), show_progress_bar=None)
    if a.index:
      index.save(a.index)
  results = rag_lib.rag(model, a.query, index, cache=a.cache, max_new_tokens=a.max_new_tokens, prompt=a.prompt,
                        max_length=a.max_length)
  for q, r in zip(a.query, results):
    print(f"query: {q}\nretrieved [{r.doc_index}] (score {r.score:.4f}): {r.document[:200]}\nanswer: {r.answer}\n")
  return 0


def _rag_corpus_index(a) -> int:
  """rag over a corpus index of `grit-jax index`: its FAISS search retrieves, the texts come from its corpus files."""
  from grit_jax.inference import corpus_index
  from grit_jax.inference import rag as rag_lib
  if a.corpus:
    raise GritJaxError(f"--corpus: --index {a.index} is a corpus index, built from its own corpus files")
  if a.doc_cache:
    check_writable_folder(os.path.dirname(os.path.abspath(a.doc_cache)), "--doc-cache", a.doc_cache)
  _check_new_tokens(a.model, a.max_new_tokens)
  index = corpus_index.CorpusIndex.load(a.index)
  index.check_corpus()
  model = _load(a.model, a.attn, a.shard_weights)
  index.check_model(model, "--index")
  results = rag_lib.rag(model, a.query, index, cache=a.cache, max_new_tokens=a.max_new_tokens, prompt=a.prompt,
                        max_length=a.max_length, doc_cache_dir=a.doc_cache)
  for q, r in zip(a.query, results):
    print(f"query: {q}\nretrieved {index.ids[r.doc_index]} (score {r.score:.4f}): {r.document[:200]}\n"
          f"answer: {r.answer}\n")
  return 0
