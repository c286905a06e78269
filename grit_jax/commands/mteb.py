"""`grit-jax mteb --model DIR --tasks T [T ...]`: mteb.evaluate with results cached per model and weights hash.

Apart from mteb_adapter because importing mteb takes seconds: the arguments (and `--help`) are handled first.
"""
from __future__ import annotations

import argparse
import re

from grit_jax.errors import GritJaxError

# Exceptions (by class name, anywhere in the chain) that mean the Hub could not be reached: datasets' and requests'
# ConnectionError, huggingface_hub's offline and not-cached errors, httpx's connect errors.
_NETWORK_ERRORS = ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError",
                   "ConnectTimeout")


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="grit-jax mteb", description="Evaluate a model directory on MTEB tasks.")
  p.add_argument("--model", required=True, help="model directory (HF export or grit_jax directory)")
  p.add_argument("--tasks", required=True, nargs="+", help="MTEB task names, e.g. SciFact NFCorpus, or a JSONL "
                 "file / folder of rows in the training format, run as a retrieval task (as grit-jax eval reads it)")
  p.add_argument("--cache", default=None, help="mteb result cache folder (default: mteb's, ~/.cache/mteb)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--name", default=None, help="the model's name in mteb's results (default: grit_jax/<model dir>, "
                 "or grit_jax/<run folder> for a run's hf export)")
  from grit_jax.commands import infer as inference_cli
  inference_cli.add_max_length(p, "text")
  a = p.parse_args(argv)
  import mteb
  from mteb.cache import ResultCache

  from grit_jax.inference.mteb_adapter import MtebEncoder
  tasks = resolve_tasks(a.tasks)  # before the model loads: a typo costs nothing
  encoder = MtebEncoder.from_pretrained(a.model, name=a.name, batch_size=a.batch_size, max_length=a.max_length)
  cache = ResultCache(a.cache) if a.cache else ResultCache()
  meta = encoder.mteb_model_meta
  for task in tasks:  # one at a time, so a failure names its task and the scores so far are printed
    try:
      results = mteb.evaluate(encoder, task, cache=cache)
    except Exception as e:  # noqa: BLE001 - only a network failure is answered; anything else propagates
      cause = network_failure(e)
      if cause is None:
        raise
      first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
      raise GritJaxError(f"MTEB task {task.metadata.name}: its data could not be downloaded ({first}); run it once "
                         "with network access (mteb caches the data and the results)") from None
    for r in results.task_results:
      print(f"{r.task_name:<30} {r.get_score():.4f}  ({meta.name}, revision {meta.revision})", flush=True)
  return 0


def resolve_tasks(names: list[str]) -> list:
  """mteb's task objects for `names` (an existing path: a local task, mteb_adapter.local_task); every unknown name
  in one line, with mteb's suggestion."""
  import os

  import mteb
  tasks, unknown = [], []
  for name in names:
    if os.path.exists(name):
      from grit_jax.inference.mteb_adapter import local_task
      tasks.append(local_task(name))
      continue
    try:
      tasks.extend(mteb.get_tasks(tasks=[name]))
    except KeyError as e:  # "KeyError: 'SciFcat' not found. Did you mean: 'SciFact'?"
      hint = re.search(r"Did you mean:? (.+?)\??$", str(e.args[0] if e.args else e))
      unknown.append(f"{name!r}" + (f" (did you mean {hint.group(1)}?)" if hint else ""))
  if unknown:
    raise GritJaxError(f"unknown MTEB task {', '.join(unknown)}; mteb.get_tasks() lists them")
  return tasks


def network_failure(e: BaseException | None) -> BaseException | None:
  """The exception in e's chain (causes and contexts) saying the network or the Hub could not be reached."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if any(c.__name__ in _NETWORK_ERRORS for c in type(e).__mro__):
      return e
    e = e.__cause__ or e.__context__
  return None
