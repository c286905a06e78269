"""`grit-jax eval --model M --data FILE|DIR`: retrieval metrics (inference.retrieval_eval) on the user's own rows."""
from __future__ import annotations

import argparse
import os

from grit_jax.commands import infer as inference_cli
from grit_jax.errors import GritJaxError
from grit_jax.inference import retrieval_eval

DESCRIPTION = "`grit-jax eval --model DIR --data DIR_OR_JSONL`: retrieval metrics of a model on the user's own rows."


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="grit-jax eval", description=DESCRIPTION)
  p.add_argument("--model", required=True, help="model directory (HF export or grit_jax directory)")
  p.add_argument("--data", required=True, help="embedding JSONL, or a folder of them (the training data format)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--output", default=None, help="also write the metrics to this JSON file")
  inference_cli.add_max_length(p, "query / passage")
  inference_cli.add_dim(p)
  inference_cli.add_packing(p)
  inference_cli.add_shard_weights(p)
  a = p.parse_args(argv)
  if a.output and not os.path.isdir(os.path.dirname(os.path.abspath(a.output))):
    raise GritJaxError(f"--output {a.output}: folder {os.path.dirname(os.path.abspath(a.output))} does not exist")
  inference_cli.model_config(a.model)  # a model directory or a GGUF file, checked before the rows are read
  inference_cli.check_dim(a.dim, a.model)
  queries, positives, corpus = retrieval_eval.read_rows(a.data)  # every row checked before the model is loaded
  from grit_jax.inference.gritlm import GritLM
  metrics = retrieval_eval.evaluate(GritLM.from_pretrained(a.model, shard_weights=a.shard_weights), queries, positives, corpus,
                     a.batch_size, a.max_length, a.packing, dim=a.dim)
  for name, value in metrics.items():
    print(f"{name:<10} {value:.4f}" if isinstance(value, float) else f"{name:<10} {value}")
  if a.output:
    from grit_jax.fileio import write_json
    write_json(a.output, metrics)
  return 0
