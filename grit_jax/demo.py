"""The main job (`make demo`): train the tiny recipe on the shipped data, then report what the training bought.

  python -m grit_jax.demo --workdir runs/demo [--steps N] [--config configs/tiny.py]

1. `grit-jax train --config configs/tiny.py --workdir runs/demo` (resumes, or skips when already finished).
2. Retrieval report: held-out queries (data/eval) against every held-out document (positives and hard negatives),
   top-1 / top-5 accuracy of the trained model vs the untrained initialisation, and example queries with what
   each model retrieves.
3. Generation report: held-out chat prompts with the trained model's greedy answers (and the reference).
4. RAG with doc caching: the retrieved document's KV cache (from its embedding pass) reused to answer the query.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from grit_jax.perf import host


def load_eval(eval_dir: str):
  """Held-out retrieval rows [(instr, query, pos_text)], the document corpus, and chats [(user, reference)]: the
  eval folder read by the training data reader (grit_jax.data.jsonl), which rejects a malformed line by file:line."""
  from grit_jax.data import jsonl

  rows, corpus, chats = [], [], []
  stats = jsonl.BadInputStats()
  files = jsonl.split_files(eval_dir)
  for path in files[jsonl.EMBEDDING]:
    for _, ex in jsonl.read_file(path, jsonl.EMBEDDING, policy="error", stats=stats, group_size=1):
      (instr, q), pos, neg = ex["query"], [t for _, t in ex["pos"]], [t for _, t in ex["neg"]]
      rows.append((instr, q, pos[0]))
      corpus.extend(pos + neg)
  for path in files[jsonl.GENERATIVE]:
    for _, ex in jsonl.read_file(path, jsonl.GENERATIVE, policy="error", stats=stats):
      if len(ex["turns"]) >= 2:
        chats.append((ex["turns"][0], ex["turns"][1]))
  corpus = list(dict.fromkeys(corpus))  # unique, in order
  return rows, corpus, chats


def retrieval_report(model, rows, corpus, k: int = 5, query_max_len: int = 64, passage_max_len: int = 64):
  """top-1 / top-k accuracy and the ranked document indices per query."""
  index = {d: i for i, d in enumerate(corpus)}
  docs = model.encode(corpus, instruction="", max_length=passage_max_len)  # [N, D], L2-normalised
  by_instr: dict[str, list[int]] = {}
  for i, (instr, _, _) in enumerate(rows):
    by_instr.setdefault(instr, []).append(i)
  queries = np.zeros([len(rows), docs.shape[1]], np.float32)  # [Q, D]
  for instr, ids in by_instr.items():
    queries[ids] = model.encode([rows[i][1] for i in ids], instruction=instr, max_length=query_max_len)
  ranked = np.argsort(-(queries @ docs.T), axis=1)  # [Q, N]
  gold = np.array([index[r[2]] for r in rows])  # [Q]
  top1 = float(np.mean(ranked[:, 0] == gold))
  topk = float(np.mean((ranked[:, :k] == gold[:, None]).any(axis=1)))
  return top1, topk, ranked


def _short(s: str, n: int = 90) -> str:
  s = " ".join(s.split())
  return s if len(s) <= n else s[:n - 3] + "..."


def untrained_model(config):
  """The GritLM the run started from (same seed, same init), for the before/after comparison."""
  import jax

  from grit_jax.data.tokenizer import Tokenizer
  from grit_jax.inference.gritlm import GritLM
  from grit_jax.training import run as run_lib

  run = run_lib.Run(config)
  params = jax.tree.map(np.asarray, run_lib.to_host(run_lib.params(run.init_state())))
  return GritLM(run.model_config, params, Tokenizer(config.data.tokenizer))


def main(argv: list[str] | None = None) -> int:
  host.prepare_cpu_host()  # before jax starts: the platform, and glibc keeps XLA's step buffers
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--steps", type=int, default=None, help="override train.steps")
  p.add_argument("--examples", type=int, default=3)
  args = p.parse_args(argv)

  from grit_jax.training import cli as train_cli
  from grit_jax.training import trainer

  train_argv = ["--config", args.config, "--workdir", args.workdir]
  if args.steps:
    train_argv.append(f"--config.train.steps={args.steps}")
  config, _ = train_cli.parse_args(train_argv)

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

  trained = GritLM.from_pretrained(os.path.join(args.workdir, "hf"))
  untrained = untrained_model(config)
  rows, corpus, chats = load_eval(config.data.eval_dir)

  print(f"\n== 2. retrieval: {len(rows)} held-out queries against {len(corpus)} held-out documents ==")
  results = {}
  for name, model in (("untrained init", untrained), ("trained", trained)):
    results[name] = retrieval_report(model, rows, corpus, query_max_len=config.data.query_max_len,
                                     passage_max_len=config.data.passage_max_len)
    print(f"{name:>15}: top-1 {results[name][0]:.1%}   top-5 {results[name][1]:.1%}")
  print(f"{'chance':>15}: top-1 {1 / len(corpus):.1%}   top-5 {min(5, len(corpus)) / len(corpus):.1%}")
  ranked = results["trained"][2]
  ranked0 = results["untrained init"][2]
  for i in range(min(args.examples, len(rows))):
    instr, q, pos = rows[i]
    print(f"\nquery: {_short(q)}" + (f"   [instruction: {_short(instr, 40)}]" if instr else ""))
    for j, d in enumerate(ranked[i, :3]):
      mark = "*" if corpus[d] == pos else " "
      print(f"  trained #{j + 1} {mark} {_short(corpus[d])}")
    d0 = ranked0[i, 0]
    print(f"  untrained #1 {'*' if corpus[d0] == pos else ' '} {_short(corpus[d0])}")
  print("  (* = the held-out positive)")

  print(f"\n== 3. generation: {min(args.examples, len(chats))} held-out prompts ==")
  prompts = [c[0] for c in chats[:args.examples]]
  answers = trained.generate(prompts, max_new_tokens=48, temperature=0.0) if prompts else []
  for (user, ref), ans in zip(chats, answers):
    print(f"\nprompt:    {_short(user)}\ngenerated: {_short(ans, 200)}\nreference: {_short(ref)}")

  if rows:
    print(f"\n== 4. RAG with doc caching over the {len(corpus)} held-out documents ==")
    _, q, _ = rows[0]
    t0 = time.time()
    out = trained.rag(q, corpus, cache="doc", max_new_tokens=24)
    print(f"query:     {_short(q)}\nretrieved: {_short(out.document)}\nanswer:    {_short(out.answer, 200)}"
          f"\n({time.time() - t0:.1f} s, index build included: each document's KV states come from its embedding "
          "pass and are reused by the generator)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
