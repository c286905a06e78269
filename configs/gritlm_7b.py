"""GritLM-7B (paper recipe, App. I): Mistral-7B, unified GRIT training.

lr 2e-5, 3% warmup then linear decay, 1253 steps (one epoch of Tulu 2 at 256 sequences per step); embedding batch
2048 queries (1 positive + 1 hard negative each), generative batch 256; lengths 256 / 2048 / 2048; mean pooling,
bidirectional embedding passes ("bbcc"); temperature 0.02; "mixed" LM loss: the token mean of 8 sub-batches of 32
("Mix 32->8"), lambda_gen 1.0.

  grit-jax train --config configs/gritlm_7b.py --workdir runs/gritlm_7b \\
    --config.init_from=hf:/path/to/Mistral-7B-v0.1 --config.data.train_dir=/path/to/grit_data \\
    --config.train.checkpoint_dir=gs://BUCKET/gritlm_7b
"""
from configs import base


def get_config():
  c = base.get_config("mistral_7b")
  c.model.dtype = "bfloat16"            # bf16 compute, float32 params and optimizer state (paper: bf16 mixed)
  c.model.scan_layers = True
  c.model.remat_policy = "full"         # the paper uses (non-reentrant) gradient checkpointing
  c.model.attention_impl = "auto"       # the target's fused kernel: splash on TPU, cuDNN on GPU (xla on CPU)
  c.init_from = ""                      # set hf:DIR (Mistral-7B-v0.1 safetensors); "" trains from scratch
  c.attn = "bbcc"

  d = c.data
  d.mode = "unified"
  d.query_max_len, d.passage_max_len, d.generative_max_len = 256, 2048, 2048
  d.train_group_size = 2
  d.embedding_batch_size = 2048
  d.generative_batch_size = 256
  d.batching = "same_dataset"
  d.pack_embedding = True               # whole sequences packed into rows: same examples and loss, ~10x fewer FLOPs
  d.pack_generative = True              # (grit_jax.data.packing; rows derived from the train data's lengths)

  l = c.loss
  l.pooling, l.normalize, l.temperature = "mean", True, 0.02
  l.lambda_rep, l.lambda_gen = 1.0, 1.0
  l.lm_loss_mode = "mixed"
  l.lm_loss_sub_batches = 8             # Mix(32->8): the reference's 8 GPUs x 32 sequences

  o = c.optimizer
  o.lr, o.warmup_ratio, o.weight_decay = 2e-5, 0.03, 0.0
  o.b1, o.b2, o.eps, o.grad_clip = 0.9, 0.999, 1e-8, 1.0

  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, -1, 1, 1

  t = c.train
  t.steps = 1253
  t.seed = 42
  t.gradcache_chunk = 0                 # packed, a device's whole embedding share is fewer tokens than one padded
                                        # GradCache chunk of 256 queries was (BENCHMARKS.md); set it to chunk again
  t.log_every = 10
  t.eval_every = 200
  t.save_every = 100
  t.keep_checkpoints = 3
  return c


def on_backbone(preset: str, recipe=None):
  """A paper recipe's settings (default: this one) on another backbone (a modeling preset): every section but the
  model, and the model's compute settings. Used by the recipes of today's backbones (llama3_1_8b.py, ...)."""
  ref = recipe or get_config()
  c = base.get_config(preset)
  for key in ("attn", "data", "loss", "optimizer", "mesh", "train"):
    c[key] = ref[key]
  for key in ("dtype", "scan_layers", "remat_policy", "attention_impl"):
    c.model[key] = ref.model[key]
  return c
