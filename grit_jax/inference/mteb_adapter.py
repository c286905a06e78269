"""An mteb (2.x) encoder for a GritLM: `mteb.evaluate(MtebEncoder.from_pretrained(dir), tasks)`.

Its ModelMeta names the model after its directory (`grit_jax/<dir name>`; a training run's `hf` export after the
run's folder) unless given a name, sets the revision to a hash of its weights (GritLM.weights_fingerprint) and
states every other setting that changes the vectors (max length, normalisation, attention, pooling, instructions)
as mteb's experiment_kwargs, so mteb's result cache keeps the results of different models, checkpoints or settings
apart; `meta.load_model()` reloads it with those settings (mteb's `loader`). `mteb run -m <dir>` cannot load
it: mteb 2.x resolves `-m` only through its own registry or the Hugging Face Hub. The command for a local
directory is `grit-jax mteb --model DIR --tasks TASK [TASK ...]` (grit_jax/commands/mteb.py).

Follows mteb's EncoderProtocol: `encode(inputs: DataLoader, *, task_metadata, hf_split, hf_subset, prompt_type)`.
Instructions as in the paper's MTEB evaluation: queries (and symmetric tasks, which have no prompt type) get the
task instruction, stripped of ": \\n" and put in the GritLM template by `encode`; documents get none, except in
reranking tasks, where the reference uses the same instruction on both sides. Embeddings are not normalised by
default (the reference's MTEB script uses normalized=False; cosine scoring is unaffected).
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

INSTRUCTION_STRIP = ": \n"
BOTH_SIDES_TASK_TYPES = ("Reranking",)


class MtebEncoder(AbsEncoder):
  """Wraps a grit_jax GritLM (anything with config/params/tokenizer) for mteb."""

  def __init__(self, model, name: str = "grit_jax/gritlm", *, revision: str | None = None, batch_size: int = 64,
               max_length: int | None = None, normalize: bool = False, instructions: dict[str, str] | None = None,
               both_sides_task_types=BOTH_SIDES_TASK_TYPES, model_dir: str | None = None):
    """`revision` defaults to model.weights_fingerprint(); `model_dir` (set by from_pretrained) makes the meta's
    loader reload the model. max_length: None = the model's embedding max length (GritLM.max_length)."""
    self.model = model
    if max_length is None and hasattr(model, "max_length"):  # what GritLM.encode uses: stated in the meta
      max_length = model.max_length()
    self.batch_size, self.max_length, self.normalize = batch_size, max_length, normalize
    self.prompts_dict = instructions  # task name / task type -> instruction (mteb's prompt priority applies)
    self.both_sides_task_types = tuple(both_sides_task_types)
    # What changes the vectors besides the weights (the revision): mteb files results per experiment.
    served = getattr(model, "settings", None)
    experiment = dict(max_length=max_length, normalize=normalize, instructions=instructions,
                      attn=getattr(served, "attn", None), pooling=getattr(served, "pooling", None))
    self.mteb_model_meta = ModelMeta(
        loader=load if model_dir else None, loader_kwargs=dict(batch_size=batch_size, model_dir=model_dir)
        if model_dir else {}, experiment_kwargs={k: v for k, v in experiment.items() if v is not None} or None,
        name=name, revision=revision or model.weights_fingerprint(), release_date=None, languages=None,
        n_parameters=int(sum(np.size(x) for x in _leaves(model.params))), memory_usage_mb=None,
        max_tokens=max_length, embed_dim=model.config.hidden_size, license=None, open_weights=None,
        public_training_code="https://github.com/ContextualAI/gritlm", public_training_data=None,
        framework=["JAX"], similarity_fn_name=ScoringFunction.COSINE, use_instructions=True,
        training_datasets=None)

  @classmethod
  def from_pretrained(cls, model_dir: str, name: str | None = None, *, attn: str | None = None,
                      pooling: str | None = None, **kwargs) -> "MtebEncoder":
    """The model of `model_dir` (GritLM.from_pretrained, with attn / pooling overriding its settings), named `name`
    (default model_name(model_dir))."""
    from grit_jax.inference.gritlm import GritLM
    given = {k: v for k, v in dict(attn=attn, pooling=pooling).items() if v is not None}
    return cls(GritLM.from_pretrained(model_dir, **given), name or model_name(model_dir),
               model_dir=os.path.abspath(model_dir), **kwargs)

  def instruction_for(self, task_metadata, prompt_type: PromptType | None) -> str:
    if prompt_type == PromptType.document and task_metadata.type not in self.both_sides_task_types:
      return ""
    return (self.get_instruction(task_metadata, prompt_type) or "").strip(INSTRUCTION_STRIP)

  def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
             prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
    texts = [t for batch in inputs for t in batch["text"]]
    # The reference embeds an empty string as just the template; our template code rejects empty text.
    texts = [t if t else " " for t in texts]
    kw = dict(batch_size=self.batch_size, max_length=self.max_length, normalize=self.normalize)
    own = LOCAL_QUERY_INSTRUCTIONS.get(task_metadata.name)
    if own is not None and prompt_type != PromptType.document:  # a local task's queries: each its row's instruction
      from grit_jax.inference import retrieval_eval
      return retrieval_eval.embed_pairs(self.model, [(own[t], t) for t in texts], **kw)
    return self.model.encode(texts, instruction=self.instruction_for(task_metadata, prompt_type), **kw)


def _leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def model_name(model_dir: str) -> str:
  """`grit_jax/<dir name>`, or `grit_jax/<run folder>` for a training run's export (RUN/hf, next to RUN's
  config.json and checkpoints/), so runs are not all named `hf` (mteb wants organisation/name; characters outside
  [A-Za-z0-9._-] become '-')."""
  path = os.path.normpath(os.path.abspath(model_dir))
  run = os.path.dirname(path)
  if os.path.isfile(os.path.join(run, "config.json")) and os.path.isdir(os.path.join(run, "checkpoints")):
    path = run
  return "grit_jax/" + (re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(path)) or "model")


def load(name: str, revision: str | None = None, *, model_dir: str, device: str | None = None,
         **settings) -> MtebEncoder:  # settings: batch_size and the experiment_kwargs
  """mteb's loader signature (`ModelMeta.load_model`): the model of `model_dir`; a `revision` that is not its weights'
  fingerprint is an error (the directory changed since the results were made)."""
  from grit_jax.errors import GritJaxError
  encoder = MtebEncoder.from_pretrained(model_dir, name, **settings)
  got = encoder.mteb_model_meta.revision
  if revision is not None and revision != got:
    raise GritJaxError(f"{model_dir}: weights fingerprint {got} is not the requested revision {revision}")
  return encoder



def local_task(path: str):
  """An mteb Retrieval task over the user's own rows: a JSONL file or folder in the training data's embedding
  format, read as `grit-jax eval` reads it (retrieval_eval.read_rows: every distinct pos/neg passage is the corpus,
  each query is relevant to its own positives). Named `Local-<file or folder name>`, its revision is a hash of the
  files' bytes (mteb's cache never serves results for other contents). Each query keeps its row's instruction
  (MtebEncoder looks it up by text in LOCAL_QUERY_INSTRUCTIONS: mteb itself has one instruction per task); passages
  must have none, as in mteb's retrieval tasks. The same metrics as `grit-jax eval` on the same rows."""
  import hashlib

  from datasets import Dataset
  from mteb.abstasks.retrieval import AbsTaskRetrieval
  from mteb.abstasks.task_metadata import TaskMetadata

  from grit_jax.data import jsonl
  from grit_jax.errors import GritJaxError
  from grit_jax.fileio import sha256_file
  from grit_jax.inference import retrieval_eval

  queries, positives, corpus = retrieval_eval.read_rows(path)
  by_text: dict[str, str] = {}
  for instr, text in queries:
    if by_text.setdefault(text, instr) != instr:
      raise GritJaxError(f"{path}: the query {text[:50]!r} appears with two instructions; an MTEB task tells its "
                         "queries apart by text only")
  if any(instr for instr, _ in corpus):
    raise GritJaxError(f"{path}: passages with an instruction: an MTEB retrieval task embeds documents without one")
  files = jsonl.split_files(path)[jsonl.EMBEDDING] if os.path.isdir(path) else [path]
  revision = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()[:16]
  name = "Local-" + (re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(os.path.normpath(path))) or "data")
  index = {p: i for i, p in enumerate(corpus)}
  split = dict(queries=Dataset.from_list([{"id": f"q{i}", "text": t} for i, (_, t) in enumerate(queries)]),
               corpus=Dataset.from_list([{"id": f"d{i}", "text": t} for i, (_, t) in enumerate(corpus)]),
               relevant_docs={f"q{i}": {f"d{index[p]}": 1 for p in pos} for i, pos in enumerate(positives)},
               top_ranked=None)

  class LocalRetrievalTask(AbsTaskRetrieval):
    metadata = TaskMetadata(
        name=name, type="Retrieval", main_score="ndcg_at_10", description=f"grit_jax rows of {path}",
        reference=None, dataset={"path": os.path.abspath(path), "revision": revision}, category="t2t",
        eval_splits=["test"], eval_langs=["eng-Latn"], date=None, dialect=None, domains=None, task_subtypes=None,
        license=None, annotations_creators=None, modalities=["text"], sample_creation=None, bibtex_citation=None)

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
      self.dataset = {"default": {"test": split}}
      self.data_loaded = True

  LOCAL_QUERY_INSTRUCTIONS[name] = by_text
  return LocalRetrievalTask()


LOCAL_QUERY_INSTRUCTIONS: dict[str, dict[str, str]] = {}  # local task name -> query text -> its instruction
