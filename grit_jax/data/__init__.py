"""GritLM data pipeline: tokenizer, templates, JSONL -> tfds builds -> seqio tasks, numpy batching, resumable
sharded training iterator. See docs/DESIGN.md ("Training batch") for the batch contract."""
from grit_jax.data.batching import to_global_batch
from grit_jax.data.iterator import TrainIterator, make_eval_iterator, make_train_iterator
from grit_jax.data.tokenizer import Tokenizer

__all__ = ["Tokenizer", "TrainIterator", "make_train_iterator", "make_eval_iterator", "to_global_batch"]
