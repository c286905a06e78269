"""LoRA (model.lora_*): a fresh adapter (B = 0) is the base model exactly; adapters merged into the kernels give the
adapter model's logits; the unmerged export is what peft loads on the same Hugging Face base (parity with peft);
a bad target is a one-line error naming the key; a train step on the 8-device mesh changes only the adapters (plain
and GradCache + packing agree), and a LoRA run's checkpoint holds only the adapters and resumes exactly."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grit_jax.errors import GritJaxError
from grit_jax.modeling import Transformer, get_config, lora
from grit_jax.modeling.config import ModelConfig

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def _random_adapters(adapters, seed=1, std=0.05):
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _forward(cfg):
  """jitted (bidirectional hidden, causal logits) of `cfg`'s model."""
  model = Transformer(cfg)
  return jax.jit(lambda p, ids, mask: (model.apply({"params": p}, ids, mask, causal=False, return_logits=False).hidden,
                                       model.apply({"params": p}, ids, mask, causal=True).logits))


def test_zero_b_is_the_base_and_merge_is_the_adapter_model():
  """In the scanned layout (adapters stacked [L, ...] like their kernels); the peft test below covers the unscanned."""
  scan = True
  base_cfg = get_config("tiny_mistral", scan_layers=scan)
  cfg = base_cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(3, cfg.vocab_size, (2, 11)), jnp.int32)
  mask = jnp.asarray(np.arange(11)[None] < np.array([[11], [7]]), jnp.int32)
  params = nn.meta.unbox(jax.jit(Transformer(cfg).init, static_argnames="causal")(
      jax.random.PRNGKey(0), ids, mask, causal=True)["params"])
  base, adapters = lora.split(params)
  # every targeted projection of every layer has A [*in, r] and B [r, *out] = 0
  n_adapted = sum(1 for _ in jax.tree.leaves(adapters))
  assert n_adapted == 2 * 7 * (1 if scan else cfg.num_layers)
  zeros_b = [not np.any(np.asarray(leaf)) for path, leaf in jax.tree.leaves_with_path(adapters)
             if "lora_b" in jax.tree_util.keystr(path)]
  assert len(zeros_b) == n_adapted // 2 and all(zeros_b)
  with_lora, plain = _forward(cfg), _forward(base_cfg)
  for got, want in zip(with_lora(params, ids, mask), plain(base, ids, mask)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  trained = lora.combine(base, _random_adapters(adapters))
  merged = lora.merge(trained, lora.scale(cfg))
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  got, want, base_logits = plain(merged, ids, mask)[1], with_lora(trained, ids, mask)[1], plain(base, ids, mask)[1]
  assert float(jnp.max(jnp.abs(want - base_logits))) > 1e-2  # the adapters matter
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides,named", [
    (dict(lora_targets=("q", "qkv")), "lora_targets='q', 'qkv'|'qkv' is not a projection"),
    (dict(lora_targets=("q", "q")), "distinct"),
    (dict(lora_rank=-1), "lora_rank"),
    (dict(lora_alpha=0.0), "lora_alpha"),
    (dict(lora_dropout=0.1), "lora_dropout"),
])
def test_bad_lora_settings_are_one_line_errors(overrides, named):
  with pytest.raises(GritJaxError, match=named) as e:
    get_config("tiny_mistral", **dict(dict(lora_rank=4), **overrides))
  assert "\n" not in str(e.value) and "model config: lora_" in str(e.value)


def test_mlp_target_on_an_all_moe_backbone_is_refused_from_the_command_line(monkeypatch):
  """Mixtral's MLPs are experts, which LoRA does not adapt: `gate` is a target it does not have (checked with the
  config, before any mesh, data or weights)."""
  from grit_jax.commands import train as train_cli
  from grit_jax import contract

  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  args = ["--config", "configs/tiny.py", "--workdir", "unused", "--config.model.num_experts=4",
          "--config.model.lora_rank=4"]
  with pytest.raises(GritJaxError, match=r"^model config: lora_targets=\('q', 'gate'\): 'gate': the backbone's "
                                         r"MLPs are all MoE experts[^\n]*$"):
    contract.validate(train_cli.parse_args(args + ["--config.model.lora_targets=('q','gate')"])[0],
                      num_devices=8, check_files=False, log=None)
  config, _ = train_cli.parse_args(args + ["--config.model.lora_targets=('q','v')"])
  assert contract.model_config(config, log=None).lora_targets == ("q", "v")
  # attention targets on the same MoE backbone are fine
  get_config("tiny_mixtral", lora_rank=4, lora_targets=("q", "k", "v", "o"))


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_peft_loads_the_adapter_export_and_equals_the_merged_export(tmp_path, kind):
  """Our unmerged export on the HF base in peft == our merged export in transformers == our JAX model, in float32
  (1e-5); llama with biases and tied embeddings, mistral plain."""
  import peft
  import torch
  import transformers

  from grit_jax.convert import hf
  from helpers_hf import make_hf_model, random_batch, torch_logits

  make_hf_model(kind, tmp_path / "base")
  base_cfg = ModelConfig.from_hf(str(tmp_path / "base"))
  cfg = base_cfg.replace(lora_rank=4, lora_alpha=16.0, lora_targets=ALL)
  base = hf.load_hf(str(tmp_path / "base"), base_cfg)
  _, adapters = lora.split(nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32),
                                                               causal=True)["params"]))
  params = lora.combine(base, _random_adapters(adapters, std=0.1))
  hf.save_peft_adapter(params, cfg, str(tmp_path / "adapter"))
  merged_dir = hf.save_hf(lora.merge(params, lora.scale(cfg), xp=np), base_cfg, str(tmp_path / "merged"))

  ids, mask = random_batch(np.random.RandomState(0), [9, 6], base_cfg.vocab_size)
  base_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
  with_peft = torch_logits(peft.PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).eval(), ids, mask)
  merged = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(),
                        ids, mask)
  ours = np.asarray(_forward(cfg)(params, ids, mask)[1])
  real = mask.astype(bool)
  assert np.abs(with_peft - torch_logits(transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "base"), dtype=torch.float32).eval(), ids, mask))[real].max() > 1e-2  # adapters applied
  np.testing.assert_allclose(with_peft[real], merged[real], rtol=0, atol=1e-5)
  np.testing.assert_allclose(ours[real], with_peft[real], rtol=0, atol=1e-5)
