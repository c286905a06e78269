"""The paper's unification claim at small scale (issue 22): from SmolLM2-135M-Instruct, the same number of steps of
embedding-only, generative-only and unified GRIT (configs/smollm2.py, the demo's recipe, changing only data.mode and
the matching batch), then held-out nDCG@10 (retrieval_eval.evaluate, what `grit-jax eval` reports) and held-out
generative loss (demo.heldout_lm_loss) of each, next to the base model. The paper's finding: unified is within about
one point of each specialist on the specialist's own measure.

  .venv/bin/python bench/unification.py [--steps 18] [--workdir runs/unification]

Each mode trains in its own workdir (a rerun resumes or skips it); ~4-5 min each on the 2-core host.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=18)
p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "unification"))
args = p.parse_args()

from grit_jax.perf import host  # noqa: E402

host.prepare_cpu_host()
from grit_jax import GritLM  # noqa: E402
from grit_jax import demo  # noqa: E402
from grit_jax.inference import retrieval_eval  # noqa: E402
from grit_jax.commands import train as train_cli  # noqa: E402
from grit_jax.training import trainer  # noqa: E402

MODES = {"embedding": ["--config.data.mode=embedding", "--config.data.generative_batch_size=0",
                       "--config.loss.lambda_gen=0.0"],
         "generative": ["--config.data.mode=generative", "--config.data.embedding_batch_size=0",
                        "--config.loss.lambda_rep=0.0"],
         "unified": []}

config = None
results = {}
for mode, extra in MODES.items():
  workdir = os.path.join(args.workdir, mode)
  config, _ = train_cli.parse_args(["--config", os.path.join(ROOT, "configs", "smollm2.py"), "--workdir", workdir,
                                    f"--config.train.steps={args.steps}", "--config.data.eval_dir="] + extra)
  trainer.train(config, workdir, progress=False)
  results[mode] = GritLM.from_pretrained(os.path.join(workdir, "hf"))

eval_dir = os.path.join(ROOT, "data", "eval")
queries, positives, corpus = retrieval_eval.read_rows(eval_dir)
chats = demo.load_chats(eval_dir)
_, base = demo.base_model(config)
print(f"{args.steps} steps each, held-out: {len(queries)} queries / {len(corpus)} documents, {len(chats)} chats")
print(f"{'model':>12}  nDCG@10  top-1   gen loss")
max_length = results["unified"].max_length()  # the trained lengths, as the demo (every mode trains with the same)
for name, model in [("base", base)] + list(results.items()):
  m = retrieval_eval.evaluate(model, queries, positives, corpus, max_length=max_length)
  print(f"{name:>12}  {m['ndcg@10']:.3f}    {m['recall@1']:.1%}  {demo.heldout_lm_loss(model, chats):.4f}",
        flush=True)
