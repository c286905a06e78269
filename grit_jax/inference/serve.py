"""`grit-jax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one loaded GritLM.

  GET  /health                 {"status": "ok", "queued", "batches", "inputs"} (no API key needed)
  GET  /v1/models              the one model, under its served name
  POST /v1/embeddings          OpenAI's request (input: str | [str] | [int] | [[int]]; encoding_format float |
                               base64; dimensions) + an `instruction` field; the vectors of GritLM.encode
  POST /v1/chat/completions    messages through the model's chat template (GritLM.chat_ids); stream=true sends each
                               token's text as it is decoded (SSE)
  POST /v1/search              {"model", "query": str | [str], "k"} when an index was given

The app checks and tokenizes each request on uvicorn's event loop (bad input is a 4xx before it queues), then hands
it to the one worker thread that owns the model (inference/serve_worker.py: dynamic batches).
Errors are OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}: 400 for bad input
(malformed JSON included), 401 for a wrong API key, 404 for an unknown model or route, 503 when the queue is full;
an internal failure is a 500 whose body names the exception type only (the traceback goes to the server log).
"""
# no `from __future__ import annotations`: FastAPI reads the request models of build_app from live annotations
import asyncio
import base64
import functools
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from typing import Literal

import numpy as np

from grit_jax.data import templates
from grit_jax.errors import GritJaxError
from grit_jax.inference import encode as encode_lib
from grit_jax.inference.serve_worker import DEFAULT_MAX_TOKENS, ApiError, Job, Worker
from grit_jax.inference.text_stream import TextStream

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # per embeddings request, as OpenAI's API
MAX_BODY_BYTES = 64 << 20  # a request body declaring more is refused (413) before it is read


# ---------------------------------------------------------------------------------------------------------------
# the HTTP app


def build_app(model, worker: Worker, *, model_name: str, api_key: str | None = None,
              max_input_tokens: int | None = None, max_inputs: int = MAX_INPUTS,
              max_body_bytes: int = MAX_BODY_BYTES):
  """The FastAPI app serving `model` through `worker`. `max_input_tokens`: the longest embedding input (template
  included) accepted, at most the model's embedding max length (the default); longer ones are a 400, never cut."""
  from fastapi import Depends, FastAPI, Request
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import JSONResponse, StreamingResponse
  from pydantic import BaseModel, ConfigDict, Field
  from starlette.exceptions import HTTPException

  limit = min(max_input_tokens or model.max_length(), model.max_length())
  context = model.config.max_position_embeddings
  created = int(time.time())

  class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, never silently ignored

  class EmbeddingRequest(Strict):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    instruction: str = ""  # grit_jax's extension: GritLM.encode's instruction
    user: str | None = None

  class TextPart(Strict):
    type: Literal["text"]
    text: str

  class Message(Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None

  class StreamOptions(Strict):
    include_usage: bool = False

  class ChatRequest(Strict):
    model: str
    messages: list[Message]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # omitted = greedy (GritLM.generate's default), not OpenAI's 1.0
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    user: str | None = None

  class SearchRequest(Strict):
    model: str
    query: str | list[str]
    k: int = Field(10, ge=1)

  def check_key(request: Request) -> None:
    if api_key is None:
      return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
      raise ApiError(401, "Incorrect API key provided" if given else "No API key provided (Authorization: Bearer "
                     "KEY)", code="invalid_api_key")

  def check_model(name: str) -> None:
    if name != model_name:
      raise ApiError(404, f"The model {name!r} does not exist (this server serves {model_name!r})", "model",
                     "model_not_found")

  async def run(kind: str, inputs: list, **args):
    return await asyncio.wrap_future(worker.submit(Job(kind, inputs, args)))

  app = FastAPI(title="grit_jax", dependencies=[])
  v1 = dict(dependencies=[Depends(check_key)])

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)

  @app.exception_handler(GritJaxError)
  async def bad_input(_, e: GritJaxError):
    return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, e: RequestValidationError):
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
      return await api_error(None, ApiError(400, f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}"
                                            f" (at character {err['loc'][-1]})"))
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    # a union field (input, content) reports every alternative: name the field and the first reason only
    loc = [x for x in loc if not x.startswith(("str", "list[", "function-"))]
    param = ".".join(loc) or None
    return await api_error(None, ApiError(400, f"{param or 'body'}: {err['msg']}", param))

  @app.exception_handler(HTTPException)
  async def http_error(_, e: HTTPException):
    return await api_error(None, ApiError(e.status_code, str(e.detail), code=str(e.status_code)))

  @app.exception_handler(Exception)
  async def internal(_, e: Exception):
    log.error("internal error", exc_info=e)
    return await api_error(None, ApiError(500, f"internal error ({type(e).__name__}); see the server log",
                                          type_="server_error"))

  @app.middleware("http")
  async def body_limit(request: Request, call_next):
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > max_body_bytes:
      return await api_error(None, ApiError(413, f"request body: {size} bytes, more than the server's limit of "
                                            f"{max_body_bytes} (max_body_bytes)", code="request_too_large"))
    return await call_next(request)

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, "queued": worker.queue.qsize(), **worker.stats}

  @app.get("/v1/models", **v1)
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "grit_jax"}]}

  def embedding_inputs(req: EmbeddingRequest) -> list:
    """Each input as templates.Encoded (ids, pool mask): text through the GritLM embedding template, token ids
    after the template's prefix (pooled alone). Empty, too long or out-of-vocabulary inputs are a 400."""
    raw = [req.input] if isinstance(req.input, str) or (req.input and isinstance(req.input[0], int)) else req.input
    if not raw:
      raise ApiError(400, "input: empty list", "input")
    if len(raw) > max_inputs:
      raise ApiError(400, f"input: {len(raw)} inputs, at most {max_inputs} per request", "input")
    out = []
    for i, x in enumerate(raw):
      if not x or (isinstance(x, str) and not x.strip()):
        raise ApiError(400, f"input[{i}]: empty", "input")
      if isinstance(x, str):
        (enc,) = encode_lib.tokenize(model, [x], req.instruction, limit)
      else:
        bad = [t for t in x if not 0 <= t < model.config.vocab_size]
        if bad:
          raise ApiError(400, f"input[{i}]: token id {bad[0]} outside the vocabulary (0..{model.config.vocab_size - 1})",
                         "input")
        fmt = templates.text_format(model.grit_tokenizer)
        prefix = model.grit_tokenizer.encode(templates.embed_prefix(req.instruction, fmt))
        ids = prefix + list(x)
        enc = templates.Encoded(np.asarray(ids[:limit], np.int32),
                                np.asarray(([0] * len(prefix) + [1] * len(x))[:limit], np.int32), len(ids) > limit)
      if enc.truncated:
        raise ApiError(400, f"input[{i}]: longer than {limit} tokens (the embedding template included; "
                       f"{'max_input_tokens' if limit < model.max_length() else 'the model embedding max length'})",
                       "input", "context_length_exceeded")
      out.append(enc)
    return out

  @app.post("/v1/embeddings", **v1)
  async def embeddings(req: EmbeddingRequest):
    check_model(req.model)
    if req.dimensions is not None and req.dimensions > model.config.hidden_size:
      raise ApiError(400, f"dimensions: {req.dimensions} > the model's {model.config.hidden_size}", "dimensions")
    tokens = embedding_inputs(req)
    emb = await run("embed", tokens)
    if req.dimensions is not None:  # the leading components, renormalised when the model normalises (OpenAI's way)
      emb = emb[:, :req.dimensions]
      if model.settings.normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    as_value = ((lambda e: base64.b64encode(np.ascontiguousarray(e, "<f4").tobytes()).decode())
                if req.encoding_format == "base64" else (lambda e: e.tolist()))
    n = sum(len(ids) for ids, _ in tokens)
    return {"object": "list", "model": model_name, "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [{"object": "embedding", "index": i, "embedding": as_value(e)} for i, e in enumerate(emb)]}

  def chat_prompt(req: ChatRequest) -> tuple[list[int], int]:
    if not req.messages:
      raise ApiError(400, "messages: empty list", "messages")
    msgs = [{"role": m.role, "content": m.content if isinstance(m.content, str)
             else "".join(p.text for p in m.content)} for m in req.messages]
    try:
      (ids,) = model.chat_ids([msgs])
    except GritJaxError as e:
      raise ApiError(400, f"messages: {e}", "messages") from None
    room = context - len(ids)
    max_tokens = req.max_completion_tokens or req.max_tokens
    if room < 1 or (max_tokens or 0) > room:
      raise ApiError(400, f"messages: the prompt is {len(ids)} tokens and max_tokens={max_tokens}, the model's "
                     f"context is {context} tokens", "messages", "context_length_exceeded")
    return ids, max_tokens or min(DEFAULT_MAX_TOKENS, room)

  @app.post("/v1/chat/completions", **v1)
  async def chat(req: ChatRequest):
    check_model(req.model)
    ids, max_tokens = chat_prompt(req)
    args = {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "seed": secrets.randbits(31) if req.seed is None else req.seed}
    reply = TextStream(model.grit_tokenizer, [req.stop] if isinstance(req.stop, str) else (req.stop or []),
                       model.config.eos_token_id)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
    if req.stream:
      return streamed(req, ids, args, reply, head)
    if req.temperature == 0:
      (out,) = await run("chat", [ids], max_tokens=max_tokens)
    else:
      (out,) = await run("sample", [ids], **args)
    content = reply.push(out, last=True)
    return {**head, "object": "chat.completion", "usage": usage(ids, out), "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reply.finish}]}

  def usage(ids, out) -> dict:
    return {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}

  def streamed(req, ids, args, reply, head):
    """Server-sent events, one chunk per piece of text as the worker decodes it (run_stream). The job is queued
    before the response starts, so a full queue is still a 503; a client that goes away stops the decoding."""
    loop, pieces, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    emit = functools.partial(loop.call_soon_threadsafe, pieces.put_nowait)
    done = asyncio.wrap_future(worker.submit(Job("stream", [ids], {**args, "emit": emit, "cancelled": cancelled})))

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
      body = {**head, "object": "chat.completion.chunk",
              "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
      return f"data: {json.dumps(body)}\n\n"

    async def events():
      try:
        yield chunk({"role": "assistant", "content": ""})
        while (new := await pieces.get()) is not None:
          if text := reply.push(new):
            yield chunk({"content": text})
        out = await done
        if text := reply.push([], last=True):
          yield chunk({"content": text})
      except GritJaxError as e:  # the status line is sent: the error goes in the stream, as OpenAI's does
        yield f"data: {json.dumps(ApiError(400, str(e)).body())}\n\n"
        return
      finally:
        cancelled.set()
      yield chunk({}, reply.finish)
      if req.stream_options and req.stream_options.include_usage:
        tail = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(ids, out)}
        yield f"data: {json.dumps(tail)}\n\n"
      yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

  if worker.searcher is not None:
    @app.post("/v1/search", **v1)
    async def search(req: SearchRequest):
      check_model(req.model)
      queries = [req.query] if isinstance(req.query, str) else req.query
      if not queries or len(queries) > max_inputs:
        raise ApiError(400, f"query: {len(queries)} queries, expected 1..{max_inputs}", "query")
      for i, q in enumerate(queries):
        if not q.strip():
          raise ApiError(400, f"query[{i}]: empty", "query")
        if encode_lib.tokenize(model, [q], "", limit)[0].truncated:
          raise ApiError(400, f"query[{i}]: longer than {limit} tokens", "query", "context_length_exceeded")
      hits = await run("search", queries, k=req.k)
      return {"object": "list", "model": model_name, "data": [
          {"object": "search_result", "index": i, "results": h} for i, h in enumerate(hits)]}

  return app


class Server:
  """The app on uvicorn in a background thread: `with Server(app, port=0) as s: s.url` (port 0 = a free one).
  What tests and bench/serve.py use; `grit-jax serve` runs uvicorn in the foreground instead."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    import uvicorn
    self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self) -> "Server":
    self.thread.start()
    while not self.server.started:
      if not self.thread.is_alive():
        raise GritJaxError("the server did not start (see the log above)")
      time.sleep(0.01)
    host, port = self.server.servers[0].sockets[0].getsockname()[:2]
    self.url = f"http://{host}:{port}"
    return self

  def __exit__(self, *exc) -> None:
    self.server.should_exit = True
    self.thread.join()
