"""Retrieval-augmented generation with GritLM's caching modes (paper section 4; reference rag/eval.py).

One model retrieves and generates. The KV states of its embedding passes are reused as the generation prefix:

  mode       cached prefix (KV of an embedding pass)                continuation (no BOS) + "The answer is"
  none       -                                                      full prompt, `prompt` format below (BOS)
  query      <s><|embed|>\\n{q}                                      \\n<|user|>\\n{doc}\\n\\nOptionally using ...
  doc        <s><|embed|>\\n{doc}   (stored in the index)            \\n<|user|>\\n{q}\\n\\nAnswer the prior query ...
  query_doc  <s><|embed|>\\n{q}  +  \\n<|embed|>\\n{doc} (no BOS)      \\n<|user|>\\nOptionally using ...
  doc_query  <s><|embed|>\\n{doc}  +  <s><|embed|>\\n{q}               \\n<|user|>\\nAnswer the prior query ...

Each cached segment keeps the RoPE positions of its own pass (starting at 0, as the reference); the continuation
starts at the total cached length. The table is GritLM's format; a model with its own chat template gets the same
user messages in that template (`prompt_formats`): the continuation is its next user turn and assistant header. Batched caches are right-padded and carry a validity mask, so no row attends
to padding (the reference's batched demo does). With causal embedding passes (`cccc`), `query` and `doc` reproduce
plain RAG on the same token sequence exactly; with bidirectional passes (`bbcc`) the cached states differ.

The document index (embeddings + document KV caches, saved and loaded): inference/rag_index.py.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from grit_jax.data import templates
from grit_jax.errors import GritJaxError
from grit_jax.inference import encode as encode_lib
from grit_jax.inference import generate as gen
from grit_jax.inference import placement
from grit_jax.inference.rag_index import RagIndex, build_index, embed_tokens

MODES = ("none", "query", "doc", "query_doc", "doc_query")

# The reference's RAG prompts (FULL_FORMAT* / the cache formats), as the user message each sends. A model's chat
# template renders them (`prompt_formats`); GritLM's own format gives the reference's strings exactly.
QUERY_FIRST = "Optionally using the prior context answer the query prior to it"
DOC_FIRST = "Answer the prior query while optionally using the context prior to it"
FULL_PROMPTS = {  # mode "none"; `prompt` picks one. emb: the first text in the embedding format, outside the chat
    "query": ("", "{query}\n\n{doc}\n\n" + QUERY_FIRST),
    "doc": ("", "{doc}\n\n{query}\n\n" + DOC_FIRST),
    "queryemb": ("{query}", "{doc}\n\n" + QUERY_FIRST),
    "docemb": ("{doc}", "{query}\n\n" + DOC_FIRST),
}
CACHE_PROMPTS = {  # the user message that follows the cached embedding pass(es)
    "query": "{doc}\n\n" + QUERY_FIRST,
    "doc": "{query}\n\n" + DOC_FIRST,
    "doc_query": DOC_FIRST,
    "query_doc": QUERY_FIRST,
}
ANSWER_PREFIX = "The answer is"


def prompt_formats(fmt: templates.TextFormat) -> tuple[dict, dict]:
  """(full, cache) prompt strings of `fmt` with {query} / {doc} fields, ending with the assistant header.

  full[p]: BOS + the chat template's first user turn; the emb variants put the embedding-format text first and its
  user turn after it. cache[m]: the user turn as the template renders it after an earlier exchange (so no system
  prompt or BOS is repeated), which follows the cached passes. For GritLM's format these are the reference's
  strings, e.g. cache["doc"] = "\\n<|user|>\\n{query}\\n\\nAnswer the prior query ...\\n<|assistant|>\\n"."""
  def fill(rendered: str, content: str) -> str:  # the template's own braces stay literal under .format
    return rendered.replace("{", "{{").replace("}", "}}").replace(_CONTENT, content)

  after = templates.render_chat(templates.PROBE[:2], False, fmt)
  later = templates.render_chat([*templates.PROBE[:2], _CONTENT], True, fmt)
  if not later.startswith(after):
    raise GritJaxError("the chat template re-renders earlier turns: a RAG continuation cannot follow a cache")
  next_turn = later[len(after):]
  first = templates.render_chat([_CONTENT], True, fmt)
  full = {name: fill(first, content) if not emb else templates.embed_prefix(None, fmt) + emb + fill(next_turn, content)
          for name, (emb, content) in FULL_PROMPTS.items()}
  return full, {mode: fill(next_turn, content) for mode, content in CACHE_PROMPTS.items()}


_CONTENT = "\x00content\x00"


# ---------------------------------------------------------------------------------------------------------------
# prompts per mode


@dataclasses.dataclass
class Prepared:
  """What generation starts from: a batched cache (or None) and the per-row continuation token ids."""
  cache: object | None
  continuation: list[list[int]]
  prefix_ids: list[list[int]] | None  # token ids the cache stands for (plain-prompt equivalent), when known


def _segment_cache(model, seqs: Sequence[Sequence[int]], causal: bool):
  """KV states of an embedding pass over token lists (per row, valid tokens only)."""
  tokens = [(np.asarray(s, np.int32), np.ones(len(s), np.int32)) for s in seqs]
  _, caches = encode_lib.encode_tokens(model, tokens, batch_size=max(1, len(seqs)),
                                       max_length=gen.bucket(max(len(s) for s in seqs)), causal=causal,
                                       with_cache=True)
  return caches


def prepare(model, queries: Sequence[str], docs: Sequence[str], mode: str, *, query_caches=None,
            doc_caches=None, query_ids=None, doc_ids=None, prompt: str = "query", causal: bool = False,
            max_length: int | None = None) -> Prepared:
  """Build the cache and continuation of each (query, retrieved doc) pair for `mode`. Caches given (from the
  retrieval pass or the index) are reused; missing ones are computed with an embedding pass."""
  tok = model.grit_tokenizer
  enc = lambda s: list(tok.encode(s))
  if mode not in MODES:
    raise GritJaxError(f"cache={mode!r}: expected one of {MODES}")
  full_formats, cache_formats = prompt_formats(templates.text_format(tok))
  n = len(queries)
  if mode == "none":
    if prompt not in FULL_PROMPTS:
      raise GritJaxError(f"prompt={prompt!r}: expected one of {tuple(FULL_PROMPTS)}")
    seqs = [enc(full_formats[prompt].format(query=q, doc=d) + ANSWER_PREFIX) for q, d in zip(queries, docs)]
    return Prepared(None, seqs, [[] for _ in range(n)])

  def joined(a, b):
    return None if a is None or b is None else [x + y for x, y in zip(a, b)]

  def embed_ids(texts):
    return [t.tolist() for t, _ in embed_tokens(model, texts, model.max_length(max_length))]

  if mode in ("query", "query_doc", "doc_query") and query_caches is None:
    query_ids = query_ids or embed_ids(queries)
    query_caches = _segment_cache(model, query_ids, causal)
  if mode in ("doc", "doc_query") and doc_caches is None:
    doc_ids = doc_ids or embed_ids(docs)
    doc_caches = _segment_cache(model, doc_ids, causal)
  if mode == "query_doc":  # the doc segment follows the query: "\n<|embed|>\n{doc}" without BOS
    doc_ids = [enc(templates.EMBED_BOS + d) for d in docs]
    doc_caches = _segment_cache(model, doc_ids, causal)

  if mode == "query":
    segments, prefix = [query_caches], query_ids
    cont = [cache_formats["query"].format(doc=d) for d in docs]
  elif mode == "doc":
    segments, prefix = [doc_caches], doc_ids
    cont = [cache_formats["doc"].format(query=q) for q in queries]
  elif mode == "query_doc":
    segments, prefix = [query_caches, doc_caches], joined(query_ids, doc_ids)
    cont = [cache_formats["query_doc"]] * n
  else:
    segments, prefix = [doc_caches, query_caches], joined(doc_ids, query_ids)
    cont = [cache_formats["doc_query"]] * n
  cache = gen.stack_caches(segments[0])
  for more in segments[1:]:
    cache = gen.concat_caches(cache, gen.stack_caches(more))
  return Prepared(cache, [enc(c + ANSWER_PREFIX) for c in cont], prefix)


def continuation_logits(model, prepared: Prepared) -> list[np.ndarray]:
  """Logits [n_b, V] over each row's continuation tokens, given its cached prefix (for tests and analysis)."""
  seqs = prepared.continuation
  T = gen.bucket(max(len(s) for s in seqs))
  ids, mask = gen.pad_rows(seqs, T, len(seqs), model.config.bos_token_id)
  if prepared.cache is None:
    cache = gen.KVCache.init(model.config, len(seqs), T, jnp.dtype(model.config.dtype))
  else:
    cache = gen.pad_cache(prepared.cache, gen.bucket_slots(int(prepared.cache.index) + T))
  start = np.asarray(cache.valid).sum(-1).astype(np.int32)
  fn = gen.continuation_logits_fn(model.config)
  logits, _ = fn(placement.generation_params(model), cache, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(start))
  logits = np.asarray(logits)
  return [logits[b, :len(s)] for b, s in enumerate(seqs)]


# ---------------------------------------------------------------------------------------------------------------
# end to end


@dataclasses.dataclass
class RagResult:
  answer: str
  document: str
  doc_index: int
  score: float

  def __str__(self) -> str:
    return self.answer


def rag(model, query, documents, cache: str = "doc", max_new_tokens: int = 16, *, prompt: str = "query",
        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, max_length: int | None = None,
        attn: str | None = None, stop_at_eos: bool = True, doc_cache_dir: str | None = None):
  """Retrieve the top-1 document for `query` (a string, or a list for a batch) from `documents` (a list of
  strings / {"title","text"} dicts, a RagIndex, or a corpus index of `grit-jax index`) and answer with caching mode `cache` (see the module doc).

  The query's embedding pass also yields its KV cache (modes query/query_doc/doc_query); doc modes take the
  document's cache from the index (built, with caches, when `documents` is a list). Returns a RagResult (str() is
  the answer), or a list of them for a list of queries. `stop_at_eos=False` forces max_new_tokens (latency runs).
  max_length: tokens per query / document embedding pass, None = the model's (GritLM.max_length); texts cut to it
  are reported once per call. doc_cache_dir (a corpus index only): where the retrieved documents' KV caches are
  kept on disk and reused (corpus_index.CorpusIndex.doc_caches); without it they are computed per call."""
  if cache not in MODES:
    raise GritJaxError(f"cache={cache!r}: expected one of {MODES}")
  with model.truncation_report():
    return _rag(model, query, documents, cache, max_new_tokens, prompt=prompt, temperature=temperature, top_p=top_p,
                seed=seed, max_length=model.max_length(max_length), attn=attn, stop_at_eos=stop_at_eos,
                doc_cache_dir=doc_cache_dir)


def _rag(model, query, documents, cache, max_new_tokens, *, prompt, temperature, top_p, seed, max_length, attn,
         stop_at_eos, doc_cache_dir):
  single = isinstance(query, str)
  queries = [query] if single else list(query)
  causal = model.embedding_causal(attn)
  if isinstance(documents, RagIndex) or hasattr(documents, "doc_caches"):  # or an inference.corpus_index
    index = documents
    index.check_model(model)
    if index.causal != causal:  # its embeddings (and caches) come from another attention than the queries'
      raise GritJaxError(f"index was built with causal={index.causal} embedding passes, the queries are embedded "
                         f"with causal={causal}: rebuild it with the same attn")
  else:
    index = build_index(model, documents, with_cache=cache in ("doc", "doc_query"), max_length=max_length,
                        attn=attn)
  q_tokens = embed_tokens(model, queries, max_length)
  keep_q = cache in ("query", "query_doc", "doc_query")
  if keep_q:  # retrieval embedding and query cache from one pass
    q_emb, q_caches = encode_lib.encode_tokens(model, q_tokens, max_length=max_length, causal=causal,
                                               with_cache=True)
  else:
    q_emb, q_caches = encode_lib.encode_tokens(model, q_tokens, max_length=max_length, causal=causal), None
  top, scores = index.search(q_emb, 1)
  hits = top[:, 0].tolist()
  docs = [index.documents[i] for i in hits]
  doc_caches = None
  if cache in ("doc", "doc_query"):
    doc_caches = index.doc_caches(model, hits, docs, max_length, doc_cache_dir) if hasattr(index, "doc_caches") \
        else [index.doc_cache(i) for i in hits]
  prepared = prepare(model, queries, docs, cache, query_caches=q_caches, doc_caches=doc_caches,
                     query_ids=[t.tolist() for t, _ in q_tokens] if keep_q else None,
                     prompt=prompt, causal=causal, max_length=max_length)
  out = gen.generate_from_cache(model, prepared.cache, prepared.continuation, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos)
  results = [RagResult(gen.decode_new(model.grit_tokenizer, o, model.config.eos_token_id), d, i, float(s))
             for o, d, i, s in zip(out, docs, hits, scores[:, 0])]
  return results[0] if single else results
