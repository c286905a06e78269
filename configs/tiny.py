"""Tiny recipe: a ~1M-parameter Mistral-shaped model trained from scratch on the sample data shipped in data/
(held-out data in data/eval). A few minutes on a laptop CPU; used by `make demo`, the notebook and the tests.

  grit-jax train --config configs/tiny.py --workdir runs/tiny
"""
from configs import base


def get_config():
  c = base.get_config("tiny_mistral")
  c.model.dtype = "float32"
  c.attn = "bbcc"

  d = c.data
  d.mode = "unified"
  d.query_max_len, d.passage_max_len, d.generative_max_len = 64, 64, 96  # instructions take ~23 tokens
  d.train_group_size = 2
  d.embedding_batch_size = 16
  d.generative_batch_size = 8

  l = c.loss
  l.pooling, l.temperature = "mean", 0.05   # a softer temperature suits a randomly initialised model
  l.lm_loss_mode = "mixed"
  l.lm_loss_sub_batches = 1

  o = c.optimizer
  o.lr = 3e-3                               # from scratch, not fine-tuning
  o.warmup_ratio = 0.05
  o.weight_decay = 0.0

  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, -1, 1, 1

  t = c.train
  t.steps = 200
  t.seed = 0
  t.log_every = 10
  t.eval_every = 100
  t.save_every = 50
  t.keep_checkpoints = 2
  return c
