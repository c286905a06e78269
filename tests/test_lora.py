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

  from grit_jax.convert import hf, peft_adapter
  from helpers_hf import make_hf_model, random_batch, torch_logits

  make_hf_model(kind, tmp_path / "base")
  base_cfg = ModelConfig.from_hf(str(tmp_path / "base"))
  cfg = base_cfg.replace(lora_rank=4, lora_alpha=16.0, lora_targets=ALL)
  base = hf.load_hf(str(tmp_path / "base"), base_cfg)
  _, adapters = lora.split(nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32),
                                                               causal=True)["params"]))
  params = lora.combine(base, _random_adapters(adapters, std=0.1))
  peft_adapter.save_peft_adapter(params, cfg, str(tmp_path / "adapter"))
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


# --- training: only the adapters move; GradCache + packing = plain; checkpoints hold the adapters; resume ---------

def test_mesh_step_trains_only_adapters_gradcache_packed_equals_plain():
  """One Adam step on the (2 data x 4 fsdp) mesh: the frozen base (bf16) is bit-identical after it, every adapter
  moved (B from 0), the optimizer holds moments for the adapters only, and GradCache (2 chunks) over a packed batch
  (one unit per device) gives the plain padded step's adapters (1e-5)."""
  from grit_jax import sharding as mesh_lib
  from grit_jax.training import optimizer as opt_lib
  from grit_jax.training import state as state_lib
  from grit_jax.training import step as step_lib
  from test_packing import pack_like
  from test_train_step import MODEL, loss_cfg, opt_cfg, random_batch

  cfg = MODEL.replace(lora_rank=4, lora_targets=ALL)
  mesh, rules = mesh_lib.make_mesh(dict(data=2, fsdp=4, tensor=1, expert=1))
  tx = opt_lib.make_optimizer(opt_cfg(warmup_ratio=0.0), 10)
  state = state_lib.create_train_state(cfg, tx, mesh, rules, jax.random.PRNGKey(0))
  # adapters sharded like their kernel: A on the kernel's input dims, B on its output dims, the rank replicated
  q = state.frozen["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec
  qa = state.params["layers_0"]["self_attn"]["q_proj"]
  assert qa["lora_a"].sharding.spec[0] == q[0] and qa["lora_b"].sharding.spec[1:] == tuple(q[1:])
  assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype("bfloat16")}
  n_adapter = len(jax.tree.leaves(state.params))
  assert n_adapter == 2 * 7
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert len(moments) == 2 * n_adapter  # mu and nu of each adapter, nothing for the base
  host = lambda t: jax.tree.map(np.asarray, t)
  # B != 0, so that A gets a gradient too (at B = 0, dL/dA = 0: a fresh adapter's first step moves only B)
  state = state.replace(params=jax.tree.map(lambda x, y: jax.device_put(y, x.sharding), state.params,
                                            _random_adapters(state.params)))
  before = host((state.params, state.frozen))
  padded = random_batch(3)
  plain = step_lib.make_train_step(cfg, loss_cfg(), mesh, rules, attn="bbcc", donate=False)
  chunked = step_lib.make_train_step(cfg, loss_cfg(), mesh, rules, attn="bbcc", gradcache_chunk=4, donate=False)
  new_plain, m_plain = plain(state, padded)
  new_chunk, m_chunk = chunked(state, pack_like(padded, units=8, row_lens=(12, 16, 16), chunks=(2, 1)))
  np.testing.assert_allclose(float(m_chunk["loss"]), float(m_plain["loss"]), rtol=1e-5)
  for new in (new_plain, new_chunk):
    params, frozen = host((new.params, new.frozen))
    jax.tree.map(np.testing.assert_array_equal, frozen, before[1])
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, before[0])
    assert min(jax.tree.leaves(moved)) > 0, moved
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), host(new_chunk.params),
               host(new_plain.params))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """The runs below share compiled steps (the same programs), as test_train_e2e's subprocesses do."""
  old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                                             "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


def test_lora_run_checkpoints_only_adapters_and_resumes_exactly(tmp_path, compile_cache, monkeypatch):
  """The tiny recipe with LoRA, packed, GradCache: a run stopped at step 2 and rerun equals the uninterrupted run;
  its checkpoints hold the adapters + their Adam moments only (counted, in bytes); the random base is saved once
  (lora_base/); ckpt-to-hf --merge writes the run's merged export, without --merge a peft adapter directory."""
  import orbax.checkpoint as ocp
  from etils import epath

  from grit_jax.commands import convert as convert_cmd
  from grit_jax.commands import train as train_cli
  from grit_jax.convert import hf, peft_adapter
  from grit_jax.fileio import read_json
  from grit_jax.training import checkpoint as ckpt_lib
  from grit_jax.training import metrics_log, trainer
  from test_train_e2e import ROOT, TINY

  monkeypatch.chdir(ROOT)
  lora_args = [*TINY, "--config.train.steps=4", "--config.model.lora_rank=4", "--config.model.lora_alpha=8.0",
               f"--config.model.lora_targets={ALL}", "--config.data.pack_embedding=True",
               "--config.data.pack_generative=True", "--config.data.pack_levels=1", "--config.train.gradcache_chunk=4",
               "--config.data.eval_dir=", "--config.optimizer.lr=1e-2"]

  def run(workdir, *extra):
    config, _ = train_cli.parse_args([*lora_args, "--workdir", str(workdir), *extra])
    return trainer.train(config, str(workdir), progress=False)

  losses = lambda w: {r["step"]: r["loss"] for r in metrics_log.read_metrics(str(w)) if r["split"] == "train"}
  run(tmp_path / "full")
  run(tmp_path / "part", "--config.train.stop_after=2")
  base_files = {p: os.path.getmtime(p) for p in (tmp_path / "part" / "lora_base").rglob("*")}
  run(tmp_path / "part")
  full, resumed = losses(tmp_path / "full"), losses(tmp_path / "part")
  assert sorted(resumed) == [1, 2, 3, 4] and len(set(full.values())) == 4
  np.testing.assert_allclose([resumed[s] for s in range(1, 5)], [full[s] for s in range(1, 5)], rtol=1e-6)
  assert {p: os.path.getmtime(p) for p in (tmp_path / "part" / "lora_base").rglob("*")} == base_files

  # the step holds step + adapters + Adam (count, mu, nu of each adapter) + the schedule's scalars: no base weight
  step_dir = tmp_path / "part" / "checkpoints" / "4"
  saved = ckpt_lib._flat_shapes(ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir / "state")))
  cfg = get_config("tiny_mistral", lora_rank=4, lora_targets=ALL)
  base_cfg_params = lora.split(jax.eval_shape(lambda: nn.meta.unbox(Transformer(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32), causal=True)["params"])))
  n_adapter = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base_cfg_params[1]))
  n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base_cfg_params[0]))
  arrays = {k: v for k, v in saved.items() if v}  # non-scalar arrays
  assert len(arrays) == 3 * 2 * 7 * cfg.num_layers  # params, mu, nu of 14 adapters per layer
  assert all("lora_a" in k or "lora_b" in k for k in arrays)
  assert sum(int(np.prod(v)) for v in arrays.values()) == 3 * n_adapter
  base_saved = ckpt_lib._flat_shapes(ocp.StandardCheckpointHandler().metadata(tmp_path / "part" / "lora_base"))
  assert sum(int(np.prod(v)) for v in base_saved.values()) == n_base  # the base: once, in its own folder

  # exports: the run's merged hf/ == ckpt-to-hf --merge of its last step; without --merge a peft adapter directory
  assert convert_cmd.main(["ckpt-to-hf", str(step_dir), str(tmp_path / "merged"), "--merge"]) == 0
  assert convert_cmd.main(["ckpt-to-hf", str(step_dir), str(tmp_path / "adapter")]) == 0
  ours, theirs = hf.load_hf(str(tmp_path / "part" / "hf")), hf.load_hf(str(tmp_path / "merged"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), ours, theirs)
  adapter = read_json(str(tmp_path / "adapter" / peft_adapter.PEFT_CONFIG))
  assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0 and len(adapter["target_modules"]) == 7
  assert sorted(os.listdir(tmp_path / "adapter")) == [peft_adapter.PEFT_CONFIG, peft_adapter.PEFT_WEIGHTS]
