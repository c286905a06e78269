"""GritLM-8x7B generative-only: 256 sequences per step, token LM loss + router aux loss, no embedding."""
from configs import gritlm_8x7b


def get_config():
  c = gritlm_8x7b.get_config()
  c.data.mode = "generative"
  c.data.embedding_batch_size = 0
  c.loss.lambda_rep = 0.0
  return c
