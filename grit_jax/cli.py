"""`grit-jax` entry point: dispatches a subcommand to the module that owns it.

Subcommand modules are imported lazily so `grit-jax --help` does not pay for importing jax and tensorflow.
Each one exposes `main(argv: list[str]) -> int`.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys

from grit_jax.errors import GritJaxError
from grit_jax.perf import host

# name -> (module, function, one-line help)
COMMANDS = {
    "train": ("grit_jax.commands.train", "main", "train with an ml-collections config (--config FILE --workdir DIR)"),
    "embed": ("grit_jax.commands.infer", "embed_main", "embed a JSONL of texts into a .npy matrix"),
    "generate": ("grit_jax.commands.infer", "generate_main", "generate a chat reply"),
    "rag": ("grit_jax.commands.infer", "rag_main", "retrieve from a corpus and answer with KV caching"),
    "serve": ("grit_jax.commands.serve", "main", "OpenAI-compatible HTTP server: embeddings, chat, search"),
    "index": ("grit_jax.commands.index", "index_main", "encode a corpus into a FAISS index (resumable, multi-host)"),
    "search": ("grit_jax.commands.index", "search_main", "search a corpus index (`grit-jax index`)"),
    "mine": ("grit_jax.commands.index", "mine_main", "mine hard negatives for a training file from a corpus index"),
    "eval": ("grit_jax.commands.eval", "main", "retrieval metrics (nDCG@10, recall@k, MRR@10) on your rows"),
    # commands.mteb parses the arguments before importing mteb (seconds), so `grit-jax mteb --help` is instant.
    "mteb": ("grit_jax.commands.mteb", "main", "MTEB tasks on a model directory (results cached per weights)"),
    "convert": ("grit_jax.commands.convert", "main", "hf-to-jax | jax-to-hf | ckpt-to-hf (RUN/checkpoints/STEP) SRC DST"),
    "aot": ("grit_jax.perf.aot", "main", "compile a recipe for a TPU topology ahead of time; print memory/FLOPs"),
}


def _usage() -> str:
  lines = ["usage: grit-jax <command> [args...]    (grit-jax <command> --help for its options; grit-jax --version)",
           "", "commands:"]
  lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
  return "\n".join(lines)


def version() -> str:
  from importlib import metadata
  try:
    return metadata.version("grit_jax")
  except metadata.PackageNotFoundError:  # run from a checkout that was never pip-installed
    return "unknown (not installed)"


def _run(argv: list[str]) -> int:
  if not argv:  # a bare `grit-jax` is a usage error, as in git or pip
    print(_usage(), file=sys.stderr)
    return 2
  if argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  if argv[0] in ("-V", "--version"):
    print(f"grit-jax {version()}")
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"grit-jax: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module, func, _ = COMMANDS[name]
  host.prepare_cpu_host()  # before the subcommand imports jax
  try:
    return int(getattr(importlib.import_module(module), func)(rest) or 0)
  except GritJaxError as e:
    print(f"grit-jax {name}: error: {e}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    code = _run(argv)
    sys.stdout.flush()  # inside the try: a reader that went away (`| head`) fails here, not at interpreter exit
    return code
  except BrokenPipeError:
    # The reader closed the pipe: stop quietly as `cat` does. SIGPIPE stays ignored (Python's default), so a broken
    # socket inside a library is an exception, never a silent kill of a training run. Point stdout at devnull so
    # the interpreter's final flush does not report the error again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
  sys.exit(main())
