"""GritLM data pipeline: tokenizer, templates, JSONL -> tfds builds -> seqio tasks, numpy batching, resumable
sharded training iterator. See docs/DESIGN.md ("Training batch") for the batch contract.

Names are imported on first use: inference imports `grit_jax.data.tokenizer` / `templates` and must not pay for
the training pipeline's TensorFlow, seqio and tfds."""
import importlib

_EXPORTS = {"Tokenizer": "tokenizer", "TrainIterator": "iterator", "make_train_iterator": "iterator",
            "make_eval_iterator": "eval_iterator", "to_global_batch": "batching"}
__all__ = list(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"grit_jax.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'grit_jax.data' has no attribute {name!r}")
