"""`grit-jax serve --model M [--index DIR] [--host H --port N] [--api-key KEY]`: the OpenAI-compatible server of
inference/serve.py on uvicorn, in the foreground (Ctrl-C stops it after the batch in progress)."""
from __future__ import annotations

import os
import time

from grit_jax.commands import infer
from grit_jax.errors import GritJaxError

DESCRIPTION = ("Serve a model over HTTP with the OpenAI API: /v1/embeddings, /v1/chat/completions (streaming too), "
               "/v1/models, /v1/search (with --index), /health; requests batched dynamically.")


def main(argv: list[str]) -> int:
  p = infer._parser("grit-jax serve", DESCRIPTION)
  p.add_argument("--index", default=None, help="a `grit-jax index` folder (FAISS) or a `grit-jax rag --index` folder "
                 "built by this model: serves /v1/search")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--api-key", default=os.environ.get("GRIT_JAX_API_KEY"),
                 help="clients must send 'Authorization: Bearer KEY' (default: $GRIT_JAX_API_KEY; none = no check)")
  p.add_argument("--served-model-name", default=None, help="the model's name in requests (default: its folder name)")
  p.add_argument("--max-batch", type=infer._positive("--max-batch"), default=64,
                 help="inputs (texts, prompts, queries) per batch; 1 = one request at a time")
  p.add_argument("--max-wait-ms", type=float, default=5.0,
                 help="how long the first request of a batch waits for others")
  p.add_argument("--max-queue", type=infer._positive("--max-queue"), default=256,
                 help="requests waiting at most; more are refused with 503")
  p.add_argument("--max-input-tokens", type=infer._positive("--max-input-tokens"), default=None,
                 help="longest embedding input (template included) accepted; default and cap: the model's embedding "
                      "max length; longer inputs are a 400, never cut")
  p.add_argument("--warmup-tokens", type=int, default=0,
                 help="before serving, compile the embedding programs of every batch shape for inputs up to this "
                      "many tokens (0 = none: the first requests of each shape wait for its compile)")
  p.add_argument("--warmup-chat-tokens", type=int, default=0,
                 help="before serving, compile the chat programs (greedy batches, sampled, streamed) for prompts up "
                      "to this many tokens and replies up to the default max_tokens (0 = none)")
  infer._add_attn(p)
  infer.add_shard_weights(p)
  a = p.parse_args(argv)
  if not 0 < a.port < 65536:
    raise GritJaxError(f"--port {a.port}: expected 1..65535")
  if a.max_wait_ms < 0:
    raise GritJaxError(f"--max-wait-ms {a.max_wait_ms}: must be >= 0")
  infer.model_config(a.model)  # a bad model path fails before anything loads
  from grit_jax.inference import corpus_index, rag_index
  corpus = bool(a.index) and corpus_index.CorpusIndex.exists(a.index)
  if a.index and not corpus and not rag_index.RagIndex.exists(a.index):
    raise GritJaxError(f"--index {a.index}: neither a corpus index (`grit-jax index`) nor a RAG index (index.json)")
  import uvicorn

  from grit_jax.inference import serve, serve_worker
  model = infer._load(a.model, a.attn, a.shard_weights)
  if corpus:
    searcher = serve_worker.corpus_index_searcher(model, corpus_index.CorpusIndex.load(a.index))
  else:
    searcher = serve_worker.rag_index_searcher(model, rag_index.RagIndex.load(a.index)) if a.index else None
  worker = serve_worker.Worker(model, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_queue=a.max_queue,
                        searcher=searcher)
  if a.warmup_tokens > 0:
    t0 = time.perf_counter()
    n = worker.warmup(a.warmup_tokens)
    print(f"compiled {n} embedding programs in {time.perf_counter() - t0:.0f} s", flush=True)
  if a.warmup_chat_tokens > 0:
    t0 = time.perf_counter()
    n = worker.warmup_chat(a.warmup_chat_tokens)
    print(f"compiled {n} chat programs in {time.perf_counter() - t0:.0f} s", flush=True)
  name = a.served_model_name or os.path.basename(os.path.normpath(a.model))
  app = serve.build_app(model, worker, model_name=name, api_key=a.api_key, max_input_tokens=a.max_input_tokens)
  print(f"serving {name} on http://{a.host}:{a.port}/v1 (max batch {a.max_batch}, max wait {a.max_wait_ms} ms"
        f"{', search over ' + a.index if a.index else ''}{', API key required' if a.api_key else ''})", flush=True)
  try:
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")
  finally:
    worker.stop()
  return 0
