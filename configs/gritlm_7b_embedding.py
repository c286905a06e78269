"""GritLM-7B embedding-only (paper ablation "Emb. only"): the 7B recipe without the generative loss."""
from configs import gritlm_7b


def get_config():
  c = gritlm_7b.get_config()
  c.data.mode = "embedding"
  c.data.generative_batch_size = 0
  c.loss.lambda_gen = 0.0
  return c
