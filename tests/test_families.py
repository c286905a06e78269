"""Every backbone family against transformers: tiny random models whose every weight is perturbed (helpers_hf
FAMILY_TINY sets what makes each family differ), causal logits and bidirectional hidden states in float32, the
hf -> jax -> hf round trip bit for bit, and the family's config read once from config.json."""

import numpy as np
import pytest

import torch

from helpers_hf import make_hf_model, random_batch, read_tensors, torch_logits

from grit_jax import GritLM
from grit_jax.convert import hf as hf_lib
from grit_jax.convert import jax_dir as jax_dir_lib
from grit_jax.convert import load as load_lib
from grit_jax.errors import GritJaxError
from grit_jax.modeling import ModelConfig

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "gemma3_text")
TOL = 1e-5
LENGTHS = [12, 7, 9]  # right-padded batch, T = 12 (longer than gemma's tiny window of 4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """family -> (transformers model, its directory, GritLM), built once per module."""
  cache = {}

  def get(family):
    if family not in cache:
      path = tmp_path_factory.mktemp(f"hf_{family}")
      hf = make_hf_model(family, path, seed=3)
      cache[family] = (hf, str(path), GritLM.from_pretrained(str(path)))
    return cache[family]

  return get


@pytest.fixture(scope="module")
def batch():
  return random_batch(np.random.RandomState(0), LENGTHS, 256)


def _real(x, mask):
  return x[np.asarray(mask, bool)]


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_logits_match_transformers(models, batch, family):
  hf, _, model = models(family)
  ids, mask = batch
  want = torch_logits(hf, ids, mask)
  got = model.logits(ids, mask)
  assert np.abs(want).max() > 1.0  # O(1) logits: the tolerance is meaningful
  np.testing.assert_allclose(_real(got, mask), _real(want, mask), atol=TOL, rtol=TOL)


def _hf_bidirectional_hidden(hf, family, ids, mask):
  """transformers' bidirectional pass: Gemma 3 through its own use_bidirectional_attention (EmbeddingGemma: full
  layers see every token, sliding layers a symmetric window), the others through a padding-only 4D mask."""
  ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
  with torch.no_grad():
    if family == "gemma3_text":
      import copy
      import transformers
      cfg = copy.deepcopy(hf.config.to_dict())
      cfg["use_bidirectional_attention"] = True
      bi = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig.from_dict(cfg)).eval()
      bi.load_state_dict(hf.state_dict())
      out = bi.model(input_ids=ids_t, attention_mask=mask_t)
    else:
      keep = mask_t.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
      out = hf.model(input_ids=ids_t, attention_mask=keep)
  return out.last_hidden_state.float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_hidden_states_match_transformers(models, batch, family):
  hf, _, model = models(family)
  ids, mask = batch
  want = _hf_bidirectional_hidden(hf, family, ids, mask)
  got = model.hidden_states(ids, mask, causal=False)
  np.testing.assert_allclose(_real(got, mask), _real(want, mask), atol=TOL, rtol=TOL)
  causal = model.hidden_states(ids, mask, causal=True)
  assert np.abs(_real(causal, mask) - _real(got, mask)).max() > 1e-2  # the mode really changes the pass


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_jax_to_hf_round_trip_is_bit_identical(models, tmp_path, family):
  _, src, _ = models(family)
  config, params = load_lib.load_pretrained(src)
  jax_dir_lib.save_jax(params, config, str(tmp_path / "jax"))
  config2, params2 = load_lib.load_pretrained(str(tmp_path / "jax"))
  assert config2 == config
  hf_lib.save_hf(params2, config2, str(tmp_path / "hf"))
  a, b = read_tensors(src), read_tensors(str(tmp_path / "hf"))
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].tobytes() == b[k].tobytes(), k
  # the written config.json reads back as the same model
  assert ModelConfig.from_hf(str(tmp_path / "hf")) == config


def test_family_statements_from_config_json(models):
  llama = ModelConfig.from_hf(models("llama")[1])
  assert (llama.family, llama.rope_type, llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.tie_word_embeddings) \
      == ("llama", "llama3", True, True, True, True)
  qwen2 = ModelConfig.from_hf(models("qwen2")[1])
  assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.sliding_window) == (True, False, None)
  qwen3 = ModelConfig.from_hf(models("qwen3")[1])
  assert (qwen3.qk_norm, qwen3.head_dim, qwen3.hidden_size) == (True, 24, 64)
  moe = ModelConfig.from_hf(models("qwen3_moe")[1])
  assert (moe.num_experts, moe.expert_size, moe.norm_topk_prob, moe.dense_layers) == (4, 48, False, (1,))
  gemma = ModelConfig.from_hf(models("gemma3_text")[1])
  assert (gemma.gemma_norms, gemma.layer_types, gemma.rope_local_theta, gemma.rope_type, gemma.hidden_act) == \
      (True, ("sliding_attention", "full_attention"), 1e4, "linear", "gelu_pytorch_tanh")


def test_unsupported_settings_are_named(tmp_path):
  base = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
              num_attention_heads=2)
  with pytest.raises(GritJaxError, match="model_type='phi3'.*llama"):
    ModelConfig.from_hf(dict(base, model_type="phi3"))
  with pytest.raises(GritJaxError, match="rope type 'yarn'"):
    ModelConfig.from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
  with pytest.raises(GritJaxError, match="hidden_act='gelu'"):
    ModelConfig.from_hf(dict(base, hidden_act="gelu"))
  # scan_layers needs the layer kinds to repeat with a period < num_layers (Gemma 3's 5 + 1 do: blocks of 6)
  S, F = "sliding_attention", "full_attention"
  gemma = dict(base, model_type="gemma3_text", sliding_window=4)
  with pytest.raises(GritJaxError, match=r"scan_layers=True: .*layer_types=\('sliding_attention', 'full_attention'\)"):
    ModelConfig.from_hf(dict(gemma, num_hidden_layers=2, layer_types=[S, F]), scan_layers=True)
  with pytest.raises(GritJaxError, match=r"scan_layers=True: .*layer_types=.*no period < num_layers=5"):
    ModelConfig.from_hf(dict(gemma, num_hidden_layers=5, layer_types=[S, F, S, F, S]), scan_layers=True)
  moe = dict(base, model_type="qwen3_moe", num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=8)
  with pytest.raises(GritJaxError, match=r"scan_layers=True: .*dense_layers=\(1,\) give no period < num_layers=4"):
    ModelConfig.from_hf(dict(moe, mlp_only_layers=[1]), scan_layers=True)
  assert ModelConfig.from_hf(dict(moe, mlp_only_layers=[1, 3]), scan_layers=True).scan_period == 2
  assert ModelConfig.from_hf(dict(gemma, num_hidden_layers=12), scan_layers=True).scan_period == 6
  assert ModelConfig.from_hf(dict(gemma, num_hidden_layers=4, layer_types=[F] * 4), scan_layers=True).scan_period == 1


@pytest.mark.parametrize("family,overrides", [
    ("gemma3_text", dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)),
    ("qwen3_moe", dict(num_hidden_layers=4, mlp_only_layers=[1, 3]))])
def test_scanned_blocks_of_layers_load_and_export(tmp_path, batch, family, overrides):
  """A model whose layer kinds repeat every P = 2 layers loads with scan_layers=True into blocks of 2
  (layers/layers_{j}, [L / 2, ...]): transformers' logits; written back to HF bit for bit; its grit_jax directory
  reloads in either layout."""
  hf = make_hf_model(family, tmp_path / "src", seed=5, **overrides)
  model = GritLM.from_pretrained(str(tmp_path / "src"), scan_layers=True)
  assert model.config.scan_period == 2 and sorted(model.params["layers"]) == ["layers_0", "layers_1"]
  ids, mask = batch
  np.testing.assert_allclose(_real(model.logits(ids, mask), mask), _real(torch_logits(hf, ids, mask), mask),
                             atol=TOL, rtol=TOL)
  hf_lib.save_hf(model.params, model.config, str(tmp_path / "hf"))
  a, b = read_tensors(str(tmp_path / "src")), read_tensors(str(tmp_path / "hf"))
  assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
  jax_dir_lib.save_jax(model.params, model.config, str(tmp_path / "jax"))
  for scan in (False, True):
    config, params = load_lib.load_pretrained(str(tmp_path / "jax"), scan_layers=scan)
    assert ("layers" in params) == scan
    hf_lib.save_hf(params, config, str(tmp_path / f"hf{scan}"))
    c = read_tensors(str(tmp_path / f"hf{scan}"))
    assert all(a[k].tobytes() == c[k].tobytes() for k in a)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("causal", [True, False])
def test_packed_rows_equal_separate_rows(models, family, causal):
  """Two sequences packed into one row (segment ids, positions restarting) give each sequence's hidden states as
  when it runs alone: packing is exact for every family's mask (Gemma's sliding and symmetric windows included)."""
  import jax.numpy as jnp

  from grit_jax.modeling import Transformer

  _, _, model = models(family)
  rng = np.random.RandomState(1)
  a, b = rng.randint(3, 256, size=7), rng.randint(3, 256, size=5)
  apply = lambda ids, **kw: np.asarray(Transformer(model.config).apply(
      {"params": model.params}, jnp.asarray(ids[None], jnp.int32), causal=causal, return_logits=False, **kw).hidden[0])
  row = np.concatenate([a, b, [0, 0]])  # 12 slots: a, b, padding
  seg = np.asarray([1] * 7 + [2] * 5 + [0, 0], np.int32)[None]
  pos = np.asarray(list(range(7)) + list(range(5)) + [0, 0], np.int32)[None]
  packed = apply(row, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
  np.testing.assert_allclose(packed[:7], apply(a), atol=TOL, rtol=TOL)
  np.testing.assert_allclose(packed[7:12], apply(b), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_grit_step_packed_on_eight_devices_equals_padded_on_one(models, family):
  """The whole GRIT step (contrastive + LM loss, gradients) of each family's real weights: packed rows on the
  (2 data x 4 fsdp) mesh == padded rows on one device (Gemma's windows, Qwen3-MoE's routed experts and aux loss)."""
  import jax
  import optax

  from grit_jax import sharding as mesh_lib
  from grit_jax.training import state as state_lib
  from grit_jax.training import step as step_lib
  from test_packing import assert_same_step, pack_like
  from test_train_step import LG, LP, LQ, loss_cfg
  from test_train_step import random_batch as grit_batch

  _, _, model = models(family)
  padded = grit_batch(12)
  packed = pack_like(padded, units=8, row_lens=(LQ, LP, LG))
  assert packed["passage_ids"].shape[0] < padded["passage_ids"].shape[0]  # really packed
  out = []
  for axes, devices, batch in ((dict(data=1, fsdp=1, tensor=1, expert=1), jax.devices()[:1], padded),
                               (dict(data=2, fsdp=4, tensor=1, expert=1), None, packed)):
    mesh, rules = mesh_lib.make_mesh(axes, devices=devices)
    _, shardings = state_lib.state_shardings(model.config, optax.sgd(1.0), mesh, rules, jax.random.PRNGKey(0))
    params = jax.device_put(model.params, shardings.params)
    out.append(jax.tree.map(np.asarray, step_lib.make_grad_fn(model.config, loss_cfg(), mesh, rules,
                                                              attn="bbcc")(params, batch)))
  (_, metrics), _ = out[0]
  assert metrics["loss_rep"] > 0.1 and metrics["loss_gen"] > 0.1
  assert_same_step(out[1], out[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_and_sentence_transformers(tmp_path, family, caplog, capfd):
  """save_pretrained of each family: transformers reads the same logits back, and sentence-transformers embeds
  (bidirectionally, mean over the text, normalised; Gemma with EmbeddingGemma's symmetric windows) as
  GritLM.encode does. transformers 5 loads any qwen2 tokenizer as Qwen2Tokenizer: with this SentencePiece
  vocabulary the export says so (its sentence-transformers check then tokenizes with grit_jax's ids)."""
  import sentence_transformers
  import transformers

  from grit_jax.data.tokenizer import Tokenizer
  from test_interop import TOKENIZER

  make_hf_model(family, tmp_path / "hf", seed=5, vocab_size=1024)
  model = GritLM.from_pretrained(str(tmp_path / "hf"))
  with caplog.at_level("WARNING"):
    GritLM(model.config, model.params, Tokenizer(TOKENIZER)).save_pretrained(str(tmp_path / "export"))
  warned = [r.getMessage() for r in caplog.records if "transformers loads this tokenizer as" in r.getMessage()]
  assert bool(warned) == (family == "qwen2"), warned
  export = GritLM.from_pretrained(str(tmp_path / "export"))
  ids, mask = random_batch(np.random.RandomState(2), LENGTHS, 1024)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32).eval()
  np.testing.assert_allclose(_real(torch_logits(hf, ids, mask), mask), _real(export.logits(ids, mask), mask),
                             atol=TOL, rtol=TOL)
  capfd.readouterr()
  st = sentence_transformers.SentenceTransformer(str(tmp_path / "export"), device="cpu")
  assert "UNEXPECTED" not in capfd.readouterr().err  # the causal-LM class: no load report about lm_head.weight
  if family == "qwen2":
    # left padding: the module runs the causal-LM class (hf_files), whose task sentence-transformers pads left
    st[0].processor = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "export" / "tokenizer.json"),
                                                           pad_token="<unk>", padding_side="left")
  texts = ["The capital of France is Paris.", "short", "Photosynthesis turns light into sugar, slowly. " * 2]
  want = export.encode(texts)
  np.testing.assert_allclose(st.encode(texts, convert_to_numpy=True), want, atol=1e-5)
  assert np.abs(export.encode(texts, attn="cccc") - want).max() > 1e-2  # the export really runs bidirectionally
