"""The worker of `grit-jax serve` (the app: inference/serve.py): one thread owns the model and runs the queued jobs
in dynamic batches; ApiError, the refusal that both the worker (a full queue) and the app raise.

Threads: uvicorn's event loop checks and tokenizes each request (bad input is a 4xx before it queues), then hands it
to ONE worker thread that owns the model (every JAX call comes from that thread) through a bounded queue. The worker
batches dynamically: it takes the oldest job, then more jobs of the same kind until `max_batch` inputs are gathered
or `max_wait_ms` have passed since the first, and runs them as one call: every embedding request of the batch (each
with its own instruction: they are token lists by then) in one `encode_tokens` call (packed / bucketed as
GritLM.encode), greedy chat requests in one `generate_ids` call (decoding to the longest max_tokens, each reply cut
to its own), sampled ones alone (their seed must not depend on the neighbours), streamed ones alone
(`generate_stream`: each decoded token handed to the request as it comes). Every reply of up to DEFAULT_MAX_TOKENS
runs the program sized for that many (generate's min_slots), so `warmup` can compile the chat programs a server meets.
"""
import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Callable, Sequence

import numpy as np

from grit_jax.data import templates
from grit_jax.errors import GritJaxError
from grit_jax.inference import encode as encode_lib
from grit_jax.inference import generate as gen


class ApiError(Exception):
  """A request refused with an HTTP status and OpenAI's error body."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------------
# the worker: one thread owns the model and runs the queued jobs in dynamic batches


@dataclasses.dataclass
class Job:
  kind: str                 # "embed" | "chat" (greedy: batched) | "sample" | "stream" (alone) | "search"
  inputs: list              # embed: templates.Encoded; chat/sample/stream: prompt ids; search: query strings
  args: dict                # chat: max_tokens per input, temperature, top_p, seed; stream: also emit, cancelled;
  #                           search: k
  future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


ALONE = ("sample", "stream")  # kinds that run one job per batch
DEFAULT_MAX_TOKENS = 256  # a chat reply without max_tokens (GritLM.generate's default), capped by the context


_STOP = object()  # the queue's last item: the worker ends after the batch before it
# (queries, k) -> per query its hits, best first: {"score", "text", and "index" or "id"}; what GritLM.search returns
# with return_text=True, so `lambda q, k: model.search(q, index, k, return_text=True)` is a Searcher
Searcher = Callable[[Sequence[str], int], list]


class Worker:
  """Runs jobs on the model in one thread. `max_batch`: inputs per batch (1 = one request at a time, the baseline
  of bench/serve.py); `max_wait_ms`: how long the first job of a batch waits for company; `max_queue`: jobs waiting
  at most (a full queue refuses new ones: 503)."""

  def __init__(self, model, *, max_batch: int = 64, max_wait_ms: float = 5.0, max_queue: int = 256,
               encode_batch_size: int = 64, searcher: Searcher | None = None):
    if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or encode_batch_size < 1:
      raise GritJaxError(f"max_batch={max_batch}, max_queue={max_queue} (>= 1), max_wait_ms={max_wait_ms} (>= 0), "
                         f"encode_batch_size={encode_batch_size} (>= 1)")
    self.model, self.searcher = model, searcher
    self.max_batch, self.max_wait, self.encode_batch_size = max_batch, max_wait_ms / 1000, encode_batch_size
    self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
    self.stats = {"batches": 0, "inputs": 0}
    self._held: Job | None = None  # a job of another kind met while gathering: it opens the next batch
    self._thread = threading.Thread(target=self._loop, name="grit-jax-serve-worker", daemon=True)
    self._thread.start()

  def warmup(self, max_tokens: int) -> int:
    """Compile the embedding programs of every batch shape up to `max_tokens` per input (each row bucket up to
    max_batch x each length bucket), so no request waits for a compile; call before serving (the counts in `stats`
    start after it). Returns the number of programs."""
    m, n, most = self.model, 0, min(self.max_batch, self.encode_batch_size)
    for t in sorted({gen.bucket(x, cap=m.max_length()) for x in range(1, min(max_tokens, m.max_length()) + 1)}):
      for rows in sorted({gen.bucket(r, cap=most, minimum=1) for r in range(1, most + 1)}):
        dummy = templates.Encoded(np.full(t, m.config.bos_token_id, np.int32), np.ones(t, np.int32), False)
        self.submit(Job("embed", [dummy] * rows, {})).result()
        n += 1
    self.stats.update(batches=0, inputs=0)
    return n

  def warmup_chat(self, prompt_tokens: int) -> int:
    """Compile the chat programs for prompts up to `prompt_tokens` (template included) and replies up to
    DEFAULT_MAX_TOKENS: greedy at each row bucket up to max_batch, sampled and streamed at one row, each prompt
    length bucket. Longer replies compile on first use. Call before serving (it runs on the calling thread).
    Returns the number of programs."""
    m, n = self.model, 0
    room = m.config.max_position_embeddings - DEFAULT_MAX_TOKENS
    lengths = sorted({gen.bucket(x) for x in range(1, min(prompt_tokens, room) + 1)})
    row_buckets = sorted({gen.bucket(r, minimum=1) for r in range(1, self.max_batch + 1)})
    # (rows, greedy, stream): run_chat's batches, run_sample, run_stream greedy and sampled
    kinds = [(rows, True, False) for rows in row_buckets] + [(1, False, False), (1, True, True), (1, False, True)]
    for t in lengths:
      for rows, greedy, stream in kinds:
        n += gen.precompile(m, rows, t, DEFAULT_MAX_TOKENS, greedy=greedy, stream=stream)
    return n

  def submit(self, job: Job) -> concurrent.futures.Future:
    try:
      self.queue.put_nowait(job)
    except queue.Full:
      raise ApiError(503, f"server busy: {self.queue.maxsize} requests queued (max_queue); retry later",
                     code="queue_full", type_="server_error") from None
    return job.future

  def stop(self) -> None:
    self.queue.put(_STOP)
    self._thread.join()

  def _next_batch(self) -> list[Job] | None:
    first, self._held = (self.queue.get() if self._held is None else self._held), None
    if first is _STOP:
      return None
    batch, size = [first], len(first.inputs)
    deadline = time.monotonic() + self.max_wait
    while first.kind not in ALONE and size < self.max_batch:
      try:
        job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if job is _STOP or job.kind != first.kind or size + len(job.inputs) > self.max_batch:
        self._held = job  # it opens the next batch (or ends the loop)
        break
      batch.append(job)
      size += len(job.inputs)
    return batch

  def _loop(self) -> None:
    while (batch := self._next_batch()) is not None:
      try:
        results = RUNS[batch[0].kind](self, batch)
      except Exception as e:  # noqa: BLE001 (the requests get it; the server stays up)
        for job in batch:
          job.future.set_exception(e)
        continue
      self.stats["batches"] += 1
      self.stats["inputs"] += sum(len(j.inputs) for j in batch)
      for job, result in zip(batch, results):
        job.future.set_result(result)

  # one function per kind: jobs -> one result per job

  def run_embed(self, jobs: list[Job]) -> list[np.ndarray]:
    m = self.model
    tokens = [t for job in jobs for t in job.inputs]
    emb = np.zeros((len(tokens), m.config.hidden_size), np.float32)  # [N, D]
    # One padded call per length bucket: no input is padded past its own bucket, so a batch never costs more tokens
    # than its requests run one by one (plus the rows' power-of-two bucket). Padded, not packed: a server meets every
    # batch composition, and packed calls would compile a program per composition (their texts per row vary), while
    # padded shapes are the few buckets `warmup` compiles; the vectors are the same (encode.py).
    by_bucket: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(tokens):
      by_bucket.setdefault(gen.bucket(len(ids), cap=m.max_length()), []).append(i)
    for idx in by_bucket.values():
      emb[idx] = encode_lib.encode_tokens(m, [tokens[i] for i in idx], self.encode_batch_size, m.max_length(),
                                          m.settings.pooling, m.settings.normalize, m.embedding_causal(),
                                          show_progress_bar=False, packing=False)
    bounds = np.cumsum([0] + [len(j.inputs) for j in jobs])
    return [emb[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

  def run_chat(self, jobs: list[Job]) -> list[list[list[int]]]:
    """Greedy jobs decode together to the longest max_tokens and are cut to their own; if the batch's longest
    prompt leaves no room for that (each job alone fits: the app checked), each job runs alone."""
    m, seqs = self.model, [s for job in jobs for s in job.inputs]
    want = [job.args["max_tokens"] for job in jobs for _ in job.inputs]
    if len(jobs) > 1 and max(map(len, seqs)) + max(want) > m.config.max_position_embeddings:
      return [out for job in jobs for out in self.run_chat([job])]
    out = gen.generate_ids(m, seqs, max(want), min_slots=DEFAULT_MAX_TOKENS)
    out = [o[:w] for o, w in zip(out, want)]
    bounds = np.cumsum([0] + [len(j.inputs) for j in jobs])
    return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

  def run_sample(self, jobs: list[Job]) -> list[list[list[int]]]:
    (job,) = jobs
    a = job.args
    return [gen.generate_ids(self.model, job.inputs, a["max_tokens"], a["temperature"], a["top_p"], a["seed"],
                             min_slots=DEFAULT_MAX_TOKENS)]

  def run_stream(self, jobs: list[Job]) -> list[list[int]]:
    """One reply streamed: args["emit"](ids) is called (from this thread) with each decoded token as it comes, then
    emit(None) at the end, also on an error; decoding stops early once args["cancelled"] (a threading.Event) is
    set, e.g. when the client went away. The result: every new id."""
    (job,) = jobs
    a, out = job.args, []
    try:
      for ids in gen.generate_stream(self.model, job.inputs[0], a["max_tokens"], a["temperature"], a["top_p"],
                                     a["seed"], min_slots=DEFAULT_MAX_TOKENS):
        out += ids
        a["emit"](ids)
        if a["cancelled"].is_set():
          break
    finally:
      a["emit"](None)
    return [out]

  def run_search(self, jobs: list[Job]) -> list[list]:
    queries = [q for job in jobs for q in job.inputs]
    hits = self.searcher(queries, max(job.args["k"] for job in jobs))
    bounds = np.cumsum([0] + [len(j.inputs) for j in jobs])
    return [[h[:job.args["k"]] for h in hits[a:b]] for job, a, b in zip(jobs, bounds[:-1], bounds[1:])]


RUNS = {"embed": Worker.run_embed, "chat": Worker.run_chat, "sample": Worker.run_sample,
        "stream": Worker.run_stream, "search": Worker.run_search}


def corpus_index_searcher(model, index) -> Searcher:
  """Search over an inference.corpus_index.CorpusIndex (the `grit-jax index` folder): GritLM.search's hits with
  their text ({"id", "score", "text"}). Runs on the worker thread."""
  index.check_model(model)
  return lambda queries, k: model.search(list(queries), index, k, return_text=True)


def rag_index_searcher(model, index) -> Searcher:
  """Search over an inference.rag_index.RagIndex (the `grit-jax rag --index` folder): queries embedded as the index's
  documents were (no instruction, the index's attention), top-k by dot product. Runs on the worker thread."""
  index.check_model(model)

  def search(queries: Sequence[str], k: int) -> list:
    causal = index.causal
    tokens = encode_lib.tokenize(model, queries, "", model.max_length())
    q = encode_lib.encode_tokens(model, tokens, 64, model.max_length(), model.settings.pooling,
                                 model.settings.normalize, causal, show_progress_bar=False)
    top, scores = index.search(q, k)
    return [[{"index": int(i), "score": float(s), "text": index.documents[i]} for i, s in zip(t, sc)]
            for t, sc in zip(top, scores)]

  return search
