"""The full config schema every recipe starts from (ml_collections). Recipes in this folder call `base.get_config()`
and change values; a key that is not here cannot be set (a misspelled override is an error).

Read by: grit_jax.data (config.data), grit_jax.objectives / training (config.loss, config.optimizer, config.mesh,
config.train), grit_jax.modeling (config.model: ModelConfig fields by name).
"""
import dataclasses
import typing

import ml_collections


def get_config(model_preset: str = "tiny_mistral") -> ml_collections.ConfigDict:
  from grit_jax.modeling import ModelConfig, get_config as get_model_config  # lazy: keeps `--help` cheap

  c = ml_collections.ConfigDict()
  # Every ModelConfig field, so `--config.model.remat_policy=full` works and a typo fails.
  c.model = ml_collections.ConfigDict(dataclasses.asdict(get_model_config(model_preset)))
  # A None default has no type to parse an override with: give it the field's (`--config.model.sliding_window=4096`).
  hints = typing.get_type_hints(ModelConfig)
  for f in dataclasses.fields(ModelConfig):
    if c.model[f.name] is None:
      kind = next(t for t in typing.get_args(hints[f.name]) if t is not type(None))
      c.model[f.name] = ml_collections.FieldReference(None, field_type=kind)
  c.init_from = ""  # "" = random init; "hf:DIR" = convert a Hugging Face checkpoint; "ckpt:DIR" = grit_jax checkpoint
  # Attention per pass, as the reference's --attn: chars 1-2 embedding (query, passage), 3-4 generative;
  # b = bidirectional, c = causal.  GritLM uses "bbcc".
  c.attn = "bbcc"

  c.data = ml_collections.ConfigDict(dict(
      train_dir="data/train",            # one JSONL per dataset; embedding vs generative told apart by keys
      eval_dir="data/eval",               # "" = no held-out evaluation
      tokenizer="data/tokenizer.model",  # SentencePiece model (Mistral's tokenizer.model for real runs)
      mode="unified",                    # unified | embedding | generative
      query_max_len=256,
      passage_max_len=2048,
      generative_max_len=2048,
      train_group_size=2,                # 1 positive + (g-1) hard negatives per query
      embedding_batch_size=8,            # global queries per step
      generative_batch_size=4,           # global generative sequences per step
      # Packing (grit_jax.data.packing, docs/DESIGN.md "Packing"): whole sequences share fixed-shape rows, so a step
      # computes text, not padding; same examples, loss and gradients as the padded step.
      pack_embedding=False,              # pack the query and passage passes
      pack_generative=False,             # pack the generative pass (exactly generative_batch_size samples per step)
      query_pack_len=0,                  # tokens per packed row; 0 = query_max_len (must be >= it)
      passage_pack_len=0,                # 0 = passage_max_len
      generative_pack_len=0,             # 0 = generative_max_len
      query_pack_rows=0,                 # rows per device (packing unit); 0 = derived from the data's lengths
      passage_pack_rows=0,
      generative_pack_rows=0,
      pack_headroom=0.05,                # top level's rows = most rows a unit needed in the sampled batches x (1 + this)
      pack_levels=3,                     # packed (rows, row length) levels derived from the data, shared by the passes;
                                         # a run compiles at most this + 1 step shapes (+1: a one-sequence-per-row fallback)
      batching="same_dataset",           # same_dataset: each step's embedding rows from one file, the files in
                                         # proportion to their sizes (the reference's sampler); mixed: any files
      no_in_batch_negatives=(),          # embedding files (names in train_dir) whose queries are contrasted with
                                         # their own positive + hard negatives only (classification / clustering)
      bad_input="skip",                  # skip (counted, reported) | error
      cache_dir="",                      # tfds builds of the JSONL folders; "" = $GRIT_JAX_CACHE/tfds or ~/.cache/grit_jax/tfds
      seed=0,
  ))

  c.loss = ml_collections.ConfigDict(dict(
      pooling="mean",                    # mean | weightedmean | lasttoken
      normalize=True,
      temperature=0.02,
      lambda_rep=1.0,
      lambda_gen=1.0,
      lm_loss_mode="mixed",              # mixed | token
      lm_loss_sub_batches=1,             # mixed: number of sub-batches the token mean is taken in (fixed, not #devices)
      lm_token_factor=1.0,               # token: multiplies sum(token CE) / num_samples
      contrastive_grad="exact",          # exact (true gradient of the global loss) | gritlm (reference: 1/W of it)
      matryoshka_dims=(),                # e.g. (64, 128, 576): L_rep summed over these normalised prefixes (increasing,
                                         # <= hidden size; the full size counts only when listed); () = off
      matryoshka_weights=(),             # one weight per dim; () = 1 each
      distill_weight=0.0,                # > 0: + this x KL(teacher || student) over each query's own candidates,
                                         # from the rows' "pos_scores" / "neg_scores" (objectives.distill_loss)
      distill_temperature=1.0,           # the teacher's softmax temperature (the student's is loss.temperature)
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=2e-5,
      warmup_ratio=0.03,                 # linear warmup over this fraction of train.steps, then linear decay to 0
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip=1.0,                     # global-norm clipping
  ))

  # Mesh axes (data, fsdp, tensor, expert) within one slice (ICI); -1 = all remaining chips. Pure FSDP by default.
  # dcn_*: the same axes across slices joined over the data-center network (multislice); -1 = all remaining
  # slices. Data parallel across slices by default: only the gradient reduction crosses the slower network.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1,
                                          dcn_data=-1, dcn_fsdp=1, dcn_tensor=1, dcn_expert=1))

  c.train = ml_collections.ConfigDict(dict(
      steps=1253,
      grad_accum=1,                      # micro-batches per step (same result as one full batch)
      gradcache_chunk=0,                 # >0: GradCache two-pass embedding with this many queries per chunk
      seed=0,
      log_every=10,
      eval_every=0,                      # 0 = only at the end
      save_every=200,
      keep_checkpoints=3,
      export_hf=True,                    # write a Hugging Face directory at the end
      checkpoint_dir="",                 # checkpoints go to <checkpoint_dir or workdir>/checkpoints (multi-host: gs://...)
      async_checkpoint=True,             # write checkpoints in the background while training continues
      stop_after=0,                      # >0: save and stop after this step (a time-limited job); rerun resumes
      allow_unverified_checkpoints=False,  # resume from a step without grit_checksums.json (older grit_jax)
  ))
  return c
