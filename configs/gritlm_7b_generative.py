"""GritLM-7B generative-only (paper ablation "Gen. only"): 256 sequences per step, "mixed" LM loss, no embedding."""
from configs import gritlm_7b


def get_config():
  c = gritlm_7b.get_config()
  c.data.mode = "generative"
  c.data.embedding_batch_size = 0
  c.loss.lambda_rep = 0.0
  c.train.gradcache_chunk = 0
  return c
