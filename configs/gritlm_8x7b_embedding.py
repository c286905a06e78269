"""GritLM-8x7B embedding-only: the 8x7B recipe without the generative loss (and so without the router aux loss)."""
from configs import gritlm_8x7b


def get_config():
  c = gritlm_8x7b.get_config()
  c.data.mode = "embedding"
  c.data.generative_batch_size = 0
  c.loss.lambda_gen = 0.0
  return c
