"""`grit-jax serve` (inference/serve.py): the real openai client against a server on 127.0.0.1 over a tiny random
model. Every answer is compared with the library call it must equal (GritLM.encode, GritLM.generate, RagIndex.search);
every bad request with its status and message; a bounded load test checks each of its responses."""
import concurrent.futures
import os
import threading

import httpx
import jax
import numpy as np
import pytest

from grit_jax.inference import serve, serve_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer.model")
NAME, KEY, LIMIT = "tiny-grit", "test-key", 48
DOCS = ["The capital of France is Paris, a city on the Seine.", "Photosynthesis turns light into sugar.",
        "Mount Everest is the highest mountain above sea level.", "A short one."]
TEXTS = ["What is the capital of France?", "highest mountain", "a somewhat longer sentence about plants and light",
         "short"]


@pytest.fixture(scope="module")
def model():
  from grit_jax.data.tokenizer import Tokenizer
  from grit_jax.inference.gritlm import GritLM
  from grit_jax.modeling import get_config, init_params
  cfg = get_config("tiny_mistral", dtype="float32")
  return GritLM(cfg, init_params(cfg, jax.random.PRNGKey(0)), Tokenizer(TOKENIZER))


@pytest.fixture(scope="module")
def index(model):
  return model.build_index(DOCS, with_cache=False)


@pytest.fixture(scope="module")
def server(model, index):
  """One server for the module: batches of up to 16 inputs gathered for 20 ms, an API key, a 48-token input limit."""
  worker = serve_worker.Worker(model, max_batch=16, max_wait_ms=20, searcher=serve_worker.rag_index_searcher(model, index))
  app = serve.build_app(model, worker, model_name=NAME, api_key=KEY, max_input_tokens=LIMIT)
  with serve.Server(app) as s:
    yield s, worker
  worker.stop()


@pytest.fixture(scope="module")
def client(server):
  import openai
  return openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0)


def test_embeddings_equal_encode(client, model):
  got = client.embeddings.create(model=NAME, input=TEXTS)  # the client asks for base64 and decodes it
  assert [d.index for d in got.data] == [0, 1, 2, 3]
  np.testing.assert_allclose(np.array([d.embedding for d in got.data]), model.encode(TEXTS), atol=1e-6, rtol=0)
  assert got.usage.prompt_tokens == sum(len(ids) for ids, _ in
                                        serve_worker.encode_lib.tokenize(model, TEXTS, "", model.max_length()))
  # floats, the instruction extension, and dimensions (the leading components, renormalised)
  got = client.embeddings.create(model=NAME, input=TEXTS[:2], encoding_format="float", dimensions=8,
                                 extra_body={"instruction": "Retrieve the answer"})
  want = model.encode(TEXTS[:2], instruction="Retrieve the answer")[:, :8]
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-6, rtol=0)
  # token ids: embedded after the template's prefix, as the same text is
  from grit_jax.data import templates
  prefix = model.grit_tokenizer.encode(templates.embed_prefix("", templates.text_format(model.grit_tokenizer)))
  full = model.grit_tokenizer.encode(templates.embed_prefix("", templates.text_format(model.grit_tokenizer)) + TEXTS[0])
  assert full[:len(prefix)] == prefix
  got = client.embeddings.create(model=NAME, input=[full[len(prefix):]])
  np.testing.assert_allclose(got.data[0].embedding, model.encode(TEXTS[0]), atol=1e-6, rtol=0)


def test_models_health_and_search(client, server, model, index):
  assert [m.id for m in client.models.list().data] == [NAME]
  health = httpx.get(server[0].url + "/health").json()
  assert health["status"] == "ok" and health["model"] == NAME
  r = httpx.post(server[0].url + "/v1/search", json={"model": NAME, "query": TEXTS[:3], "k": 2},
                 headers={"Authorization": f"Bearer {KEY}"})
  assert r.status_code == 200, r.text
  top, scores = index.search(model.encode(TEXTS[:3]), 2)
  got = r.json()["data"]
  assert [[h["index"] for h in q["results"]] for q in got] == top.tolist()
  np.testing.assert_allclose([[h["score"] for h in q["results"]] for q in got], scores, atol=1e-6)
  assert got[0]["results"][0]["text"] == DOCS[top[0, 0]]


def test_chat_equals_generate_streaming_and_not(client, server, model):
  msgs = [{"role": "user", "content": "Why is the sky blue?"}]
  want = model.generate(msgs, max_new_tokens=16)[0]
  got = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0)
  assert got.choices[0].message.content == want and want
  assert got.usage.prompt_tokens == len(model.chat_ids([msgs])[0])
  assert got.choices[0].finish_reason in ("stop", "length") and 1 <= got.usage.completion_tokens <= 16
  stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, stream=True,
                                          stream_options={"include_usage": True})
  chunks = list(stream)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
  assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # token pieces, not one blob
  assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
  # greedy jobs run as one batch (to the longest max_tokens, a power of two), each cut to its own max_tokens
  prompts = [[{"role": "user", "content": c}] for c in ("Hi", "Tell me about mountains please", "Why?")]
  jobs = [serve_worker.Job("chat", model.chat_ids([p]), {"max_tokens": n}) for p, n in zip(prompts, (3, 16, 9))]
  for job, (out,) in zip(jobs, server[1].run_chat(jobs)):
    assert out == serve_worker.gen.generate_ids(model, job.inputs, 16)[0][:job.args["max_tokens"]]
  # sampling: the seed reproduces GritLM.generate's sample, streamed or not
  sample = model.generate(msgs, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)[0]
  got = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0.8, top_p=0.9, seed=3)
  assert got.choices[0].message.content == sample
  stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0.8, top_p=0.9,
                                          seed=3, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == sample


def test_streamed_tokens_leave_the_worker_one_by_one_and_stop_when_cancelled(server, model):
  """The worker hands each token to the request as it is decoded (one emit per token, then None), not the reply at
  the end; a cancelled request (its client went away) stops decoding after the token in hand."""
  ids = model.chat_ids([[{"role": "user", "content": "Why is the sky blue?"}]])[0]
  want = serve_worker.gen.generate_ids(model, [ids], 12)[0]
  emitted, cancelled = [], threading.Event()
  args = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "seed": 0, "emit": emitted.append,
          "cancelled": cancelled}
  out = server[1].submit(serve_worker.Job("stream", [ids], args)).result()
  assert out == want and len(out) > 2
  assert emitted == [[t] for t in out] + [None]
  emitted.clear()
  args["emit"] = lambda new: (emitted.append(new), cancelled.set())
  out = server[1].submit(serve_worker.Job("stream", [ids], args)).result()
  assert len(out) == 1 and emitted == [out, None]


def test_text_stream_holds_back_partial_characters_and_stops():
  """Pieces join to the decoded reply; a multi-byte character is sent once whole; text that may begin a stop string
  waits, and the reply ends before the stop (OpenAI's rule); </s> ends it; what waits is released at the end."""
  from grit_jax.data.tokenizer import Tokenizer
  from grit_jax.inference.text_stream import TextStream
  tok = Tokenizer(TOKENIZER)
  ids = tok.encode("Paris é 🙂 END of it")
  eos = tok.eos_id
  whole = TextStream(tok, [], eos)
  assert whole.push(ids + [eos, 7], last=True) == tok.decode(ids) and whole.finish == "stop"
  one = TextStream(tok, [], eos)
  pieces = [one.push([t]) for t in ids] + [one.push([], last=True)]
  assert "".join(pieces) == tok.decode(ids) and one.finish == "length"
  assert all("\ufffd" not in p for p in pieces)
  stop = TextStream(tok, ["END", "zzz"], eos)
  pieces = [stop.push([t]) for t in ids]
  assert "".join(pieces) == tok.decode(ids).split("END")[0] and stop.finish == "stop"
  assert stop.push([5], last=True) == ""  # ended: later ids are ignored
  held = TextStream(tok, [tok.decode(ids) + "!"], eos)  # every prefix of the reply may begin it
  sent = "".join(held.push([t]) for t in ids)
  assert sent == "" and held.push([], last=True) == tok.decode(ids) and held.finish == "length"


def test_bad_requests_are_4xx_with_their_message(client, server):
  import openai
  cases = [
      (openai.BadRequestError, dict(input=""), "input[0]: empty"),
      (openai.BadRequestError, dict(input=[]), "input: empty list"),
      (openai.BadRequestError, dict(input="word " * 60), f"input[0]: longer than {LIMIT} tokens"),
      (openai.BadRequestError, dict(input=[[5, 99999]]), "input[0]: token id 99999 outside the vocabulary"),
      (openai.BadRequestError, dict(input="x", dimensions=10_000), "dimensions: 10000 > the model's 64"),
      (openai.NotFoundError, dict(input="x", model="gpt-4"), "The model 'gpt-4' does not exist"),
      (openai.BadRequestError, dict(input="x", extra_body={"pooling": "cls"}), "pooling: Extra inputs"),
  ]
  for error, kwargs, message in cases:
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
      client.embeddings.create(**{"model": NAME, **kwargs})
  with pytest.raises(openai.BadRequestError, match="messages: .*user"):
    client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "be brief"}], max_tokens=2)
  with pytest.raises(openai.BadRequestError, match="context is 2048 tokens"):
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
  with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
    openai.OpenAI(base_url=server[0].url + "/v1", api_key="wrong", max_retries=0).models.list()
  r = httpx.post(server[0].url + "/v1/embeddings", content=b'{"model": "tiny-grit", "input": ["a",',
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
  assert r.status_code == 400 and r.json()["error"]["message"].startswith("malformed JSON body")
  # a body declared larger than the limit is refused from its headers, before it is sent
  import socket
  host, port = server[0].url.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port))) as sock:
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000000\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
        reply.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
      reply += sock.recv(65536)
    reply = reply.decode()
  assert reply.startswith("HTTP/1.1 413") and "more than the server's limit of 67108864" in reply, reply
  r = httpx.get(server[0].url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
  assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"


def test_full_queue_is_503(model, monkeypatch):
  release = threading.Event()
  monkeypatch.setitem(serve_worker.RUNS, "block", lambda self, jobs: [release.wait()])
  worker = serve_worker.Worker(model, max_queue=1, max_wait_ms=0)
  with serve.Server(serve.build_app(model, worker, model_name=NAME)) as s:
    blocked = worker.submit(serve_worker.Job("block", [0], {}))
    while not worker.queue.empty():  # the worker holds the blocking job
      pass
    queued = worker.submit(serve_worker.Job("embed", serve_worker.encode_lib.tokenize(model, ["x"], "", 64), {}))
    r = httpx.post(s.url + "/v1/embeddings", json={"model": NAME, "input": "y"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"].startswith("server busy: 1 requests queued")
    release.set()
    assert blocked.result(timeout=60) is True
    np.testing.assert_allclose(queued.result(timeout=60)[0], model.encode("x"), atol=1e-6)
  worker.stop()


def test_warmup_compiles_every_batch_shape(client, server):
  """After warmup(16) no embedding request of inputs up to 16 tokens compiles a program (rows 1..16 in buckets)."""
  assert server[1].warmup(16) == 5  # rows 1, 2, 4, 8, 16 (rounded up to the 8 devices: 2 programs) x length 16
  traced = dict(serve_worker.gen.TRACE_COUNTS)
  for inputs in (["a"], ["b c", "d"], ["e"] * 5, ["f g"] * 11):
    client.embeddings.create(model=NAME, input=inputs)
  assert serve_worker.gen.TRACE_COUNTS == traced


def test_warmup_chat_compiles_the_chat_programs(client, server, model):
  """After warmup_chat(16), greedy batches, sampled and streamed replies to prompts of up to 16 tokens, of any
  max_tokens up to the default reply, compile nothing, and still equal GritLM.generate's (whose programs are sized
  to each reply: the same tokens from a smaller cache)."""
  assert server[1].warmup_chat(16) == 5 + 1 + 2 * 2  # prompts of 16 x (greedy rows 1..16, sampled, 2 streams)
  msgs = [{"role": "user", "content": "Sky?"}]
  sample = dict(temperature=0.8, top_p=0.9)
  want = {n: (model.generate(msgs, max_new_tokens=n)[0], model.generate(msgs, max_new_tokens=n, seed=n, **sample)[0])
          for n in (3, 40, 200)}
  jobs = [serve_worker.Job("chat", model.chat_ids([[{"role": "user", "content": c}]]), {"max_tokens": n})
          for c, n in (("Hi", 3), ("Why?", 200), ("Blue?", 40))]
  assert max(len(j.inputs[0]) for j in jobs) <= 16 and len(model.chat_ids([msgs])[0]) <= 16
  want_batch = [serve_worker.gen.generate_ids(model, j.inputs, j.args["max_tokens"])[0] for j in jobs]
  traced = dict(serve_worker.gen.TRACE_COUNTS)
  for n, (greedy, sampled) in want.items():
    assert client.chat.completions.create(model=NAME, messages=msgs, max_tokens=n).choices[0].message.content == greedy
    got = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=n, seed=n, **sample)
    assert got.choices[0].message.content == sampled
    for kw in ({}, dict(seed=n, **sample)):
      stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=n, stream=True, **kw)
      assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (sampled if kw else greedy)
  assert [out for (out,) in server[1].run_chat(jobs)] == want_batch
  assert serve_worker.gen.TRACE_COUNTS == traced


def test_load_every_response_checked(client, server, model):
  """8 concurrent clients x 6 requests (1-3 texts, one of two instructions): each vector equals GritLM.encode's, and
  the worker ran them in fewer batches than requests (dynamic batching)."""
  rng = np.random.default_rng(0)
  texts = [f"{w} number {i}" for i, w in enumerate(["apple", "river", "stone", "cloud", "engine", "garden"] * 3)]
  instructions = ["", "Retrieve the passage"]
  want = {ins: dict(zip(texts, model.encode(texts, instruction=ins))) for ins in instructions}
  plans = [[(list(rng.choice(texts, rng.integers(1, 4), replace=False)), instructions[rng.integers(2)])
            for _ in range(6)] for _ in range(8)]
  before = dict(server[1].stats)

  def one_client(plan):
    errors = 0
    for inputs, ins in plan:
      got = client.embeddings.create(model=NAME, input=inputs, extra_body={"instruction": ins})
      errors += sum(not np.allclose(d.embedding, want[ins][t], atol=1e-6, rtol=0) for d, t in zip(got.data, inputs))
    return errors

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    assert sum(pool.map(one_client, plans)) == 0
  batches = server[1].stats["batches"] - before["batches"]
  assert server[1].stats["inputs"] - before["inputs"] == sum(len(x) for p in plans for x, _ in p)
  assert batches < 48, batches


def test_cli_serve_end_to_end(model, index, tmp_path, capsys):
  """`grit-jax serve` as a user starts it: bad flags are one line before anything loads; a saved model and index
  serve the same vectors and hits; Ctrl-C stops it cleanly."""
  import signal
  import socket
  import subprocess
  import sys
  import time
  from grit_jax import cli
  model_dir, index_dir = str(tmp_path / "tiny"), str(tmp_path / "index")
  model.save_pretrained(model_dir)
  index.save(index_dir)
  assert cli.main(["serve", "--model", model_dir, "--index", str(tmp_path / "none")]) == 2
  assert "--index" in capsys.readouterr().err
  assert cli.main(["serve", "--model", str(tmp_path / "none")]) == 2
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), GRIT_JAX_API_KEY="k2")
  proc = subprocess.Popen([sys.executable, "-m", "grit_jax.cli", "serve", "--model", model_dir, "--index", index_dir,
                           "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k2"}
  try:
    for _ in range(600):
      try:
        if httpx.get(url + "/health").status_code == 200:
          break
      except httpx.TransportError:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    r = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": TEXTS[1], "encoding_format": "float"},
                   headers=auth, timeout=120)
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], model.encode(TEXTS[1]), atol=1e-6, rtol=0)
    r = httpx.post(url + "/v1/search", json={"model": "tiny", "query": TEXTS[0], "k": 1}, headers=auth, timeout=120)
    assert r.json()["data"][0]["results"][0]["index"] == int(index.search(model.encode(TEXTS[:1]), 1)[0][0, 0])
  finally:
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0 and "serving tiny on" in out and "Traceback" not in out, out
