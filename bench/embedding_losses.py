"""Issue 24 items 3-4 at small scale: from SmolLM2-135M-Instruct, the same steps of the demo's recipe
(configs/smollm2.py) with the plain GRIT loss, with Matryoshka dimensions (loss.matryoshka_dims=64,128,256,576) and
with distillation from teacher scores, then held-out nDCG@10 (retrieval_eval.evaluate, what `grit-jax eval`
reports) of each at each Matryoshka dimension (embeddings truncated and re-normalised: `encode(..., dim=k)`),
next to the base model.

The shipped data has no teacher scores. The distillation run is a SELF-distillation sanity run: its teacher
scores are the base model's own cosine similarities of each training row's positive and negatives (written
beside the shipped rows as pos_scores / neg_scores), with distill_temperature = loss.temperature, so the teacher
is the base model's own candidate distribution. It shows the term is wired and what it does to the numbers
(pulls the student towards its starting point); it says nothing about distillation from a stronger teacher.

  .venv/bin/python bench/embedding_losses.py [--steps 18] [--workdir runs/embedding_losses] [--runs plain,...]

Each run trains in its own workdir (a rerun resumes or skips it); ~4-6 min each on the 2-core host.
"""
import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=18)
p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "embedding_losses"))
p.add_argument("--runs", default="plain,matryoshka", help="comma-separated: plain, matryoshka, self_distill, mined")
p.add_argument("--mine-margin", type=float, default=0.05, help="mined: grit-jax mine's --margin")
p.add_argument("--mine-margin-type", default="relative", help="mined: grit-jax mine's --margin-type")
p.add_argument("--mine-range-min", type=int, default=0, help="mined: grit-jax mine's --range-min (ranks kept: "
               "[range-min, 30))")
p.add_argument("--miner", default=None, help="mined: the model that mines (an export folder, e.g. the plain "
               "run's hf/); default the base model")
args = p.parse_args()

from grit_jax.perf import host  # noqa: E402

host.prepare_cpu_host()
from grit_jax import GritLM  # noqa: E402
from grit_jax import demo  # noqa: E402
from grit_jax.commands import train as train_cli  # noqa: E402
from grit_jax.data import jsonl  # noqa: E402
from grit_jax.fileio import atomic_write  # noqa: E402
from grit_jax.inference import retrieval_eval  # noqa: E402
from grit_jax.training import trainer  # noqa: E402

DIMS = (64, 128, 256, 576)
RECIPE = os.path.join(ROOT, "configs", "smollm2.py")


def parse(workdir, extra):
  config, _ = train_cli.parse_args(["--config", RECIPE, "--workdir", workdir, f"--config.train.steps={args.steps}",
                                    "--config.data.eval_dir="] + extra)
  return config


def derived_data(config, out_dir, rows_of):
  """A copy of data/train whose embedding files hold rows_of(path) instead (the generative files as they are),
  built beside `out_dir` and renamed into place once whole; a folder already there is reused."""
  if os.path.isdir(out_dir):
    return out_dir
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  files = jsonl.split_files(config.data.train_dir)
  for path in files[jsonl.GENERATIVE]:
    shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
  for path in files[jsonl.EMBEDDING]:
    rows = rows_of(path)
    atomic_write(os.path.join(tmp, os.path.basename(path)), lambda f: f.writelines(json.dumps(r) + "\n" for r in rows))
  os.rename(tmp, out_dir)
  return out_dir


def self_distill_data(base, config, out_dir):
  """data/train with pos_scores / neg_scores = the base model's cosine similarities (at the recipe's lengths)."""
  from grit_jax.inference import mine as mine_lib
  kw = dict(normalize=True)

  def scored(path):
    rows = mine_lib.read_rows(path)
    parsed = [jsonl.parse_embedding(r, config.data.train_group_size) for r in rows]
    q_QD = retrieval_eval.embed_pairs(base, [r["query"] for r in parsed], max_length=config.data.query_max_len, **kw)
    for key in ("pos", "neg"):
      flat = [pair for r in parsed for pair in r[key]]
      e_ND = retrieval_eval.embed_pairs(base, flat, max_length=config.data.passage_max_len, **kw)
      start = 0
      for i, (row, r) in enumerate(zip(rows, parsed)):
        n = len(r[key])
        row[f"{key}_scores"] = [round(float(v), 6) for v in e_ND[start:start + n] @ q_QD[i]]
        start += n
    return rows

  return derived_data(config, out_dir, scored)


def mined_data(base, config, out_dir):
  """data/train with each embedding row's `neg` mined by `grit-jax mine` with `base` (the base model, or --miner),
  ranks [--mine-range-min, 30): by default
  the NV-Embed recipe (dropping candidates scoring above 95% of the positive; --mine-margin-type absolute
  --mine-margin 0: only those scoring above the positive itself); the corpus is every distinct passage text of the
  training files, the same number of negatives per row as shipped (train_group_size - 1). A row left with none is
  skipped by training, counted in its bad-input report."""
  if os.path.isdir(out_dir):
    return out_dir
  from grit_jax.inference import corpus_index as ci
  from grit_jax.inference import mine as mine_lib
  emb_files = jsonl.split_files(config.data.train_dir)[jsonl.EMBEDDING]
  texts = {}
  for path in emb_files:
    for row in mine_lib.read_rows(path):
      for x in row["pos"] + row.get("neg", []):
        texts.setdefault(mine_lib.entry_parts(x)[1], len(texts))
  corpus = os.path.join(args.workdir, "mined_corpus.jsonl")
  atomic_write(corpus, lambda f: f.writelines(json.dumps({"id": i, "text": t}) + "\n" for t, i in texts.items()))
  index = ci.build(base, [corpus], os.path.join(args.workdir, MINED + "_index"), max_length=config.data.passage_max_len)
  short = []

  def mined(path):
    rows, n = mine_lib.mine(base, mine_lib.read_rows(path), index, negatives=config.data.train_group_size - 1,
                            range_min=args.mine_range_min, range_max=30, margin=args.mine_margin, margin_type=args.mine_margin_type)
    short.append(n)
    return rows

  derived_data(config, out_dir, mined)
  print(f"mined: {len(texts)} corpus passages; {sum(short)} rows got fewer negatives than asked", flush=True)
  return out_dir


base_config = parse(os.path.join(args.workdir, "plain"), [])
_base = []


def base():
  """The base model, loaded once when first needed (not while a run trains: the host has 24 GB)."""
  if not _base:
    _base.append(demo.base_model(base_config)[1])
  return _base[0]


RUNS = {
    "plain": [],
    "matryoshka": [f"--config.loss.matryoshka_dims={DIMS}"],
    "self_distill": lambda: [f"--config.data.train_dir={self_distill_data(base(), base_config, os.path.join(args.workdir, 'self_distill_data'))}",
                             "--config.loss.distill_weight=1.0",
                             f"--config.loss.distill_temperature={base_config.loss.temperature}"],
    "mined": lambda: [f"--config.data.train_dir={mined_data(miner(), base_config, os.path.join(args.workdir, MINED + '_data'))}"],
}


def miner():
  return GritLM.from_pretrained(args.miner) if args.miner else base()


# the first mined run (base model, ranks 0-30, NV-Embed's 95%) keeps its plain name; other settings get their own
# run, data and index folders
MINED = "mined"
if (args.mine_margin, args.mine_margin_type) != (0.05, "relative"):
  MINED += f"_{args.mine_margin_type}_{args.mine_margin:g}"
if args.mine_range_min:
  MINED += f"_from{args.mine_range_min}"
if args.miner:
  MINED += "_by_" + os.path.basename(os.path.dirname(os.path.abspath(args.miner)))
RUNS[MINED] = RUNS.pop("mined")
names = [MINED if n == "mined" else n for n in args.runs.split(",")]
for name in names:
  workdir = os.path.join(args.workdir, name)
  extra = RUNS[name]() if callable(RUNS[name]) else RUNS[name]
  _base.clear()  # free the teacher before training
  summary = trainer.train(parse(workdir, extra), workdir, progress=False)
  print(f"{name}: trained ({summary.get('loss_rep', float('nan')):.4f} final loss_rep)", flush=True)

eval_dir = os.path.join(ROOT, "data", "eval")
queries, positives, corpus = retrieval_eval.read_rows(eval_dir)
max_length = GritLM.from_pretrained(os.path.join(args.workdir, names[0], "hf")).max_length()  # the trained lengths
print(f"\n{args.steps} steps each; held-out: {len(queries)} queries / {len(corpus)} documents; nDCG@10 at each "
      f"embedding size (first k components, re-normalised)")
print(f"{'model':>14}  " + "  ".join(f"{k:>6}" for k in DIMS))
table = {}
for name in ["base"] + names:  # one model in memory at a time
  model = base() if name == "base" else GritLM.from_pretrained(os.path.join(args.workdir, name, "hf"))
  table[name] = [retrieval_eval.evaluate(model, queries, positives, corpus, max_length=max_length, dim=k)["ndcg@10"]
                 for k in DIMS]
  _base.clear()
  del model
  print(f"{name:>14}  " + "  ".join(f"{v:6.3f}" for v in table[name]), flush=True)
print(json.dumps({"steps": args.steps, "dims": DIMS, "ndcg@10": table}))
