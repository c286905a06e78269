"""notebooks/grit_jax_demo.ipynb executes top to bottom on CPU (nbclient), with the tiny recipe cut to a few steps."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "grit_jax_demo.ipynb")


@pytest.mark.slow
def test_notebook_executes_on_cpu(tmp_path):
  import nbclient
  import nbformat

  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Parameters")]
  assert len(params) == 1, "the notebook needs one '# Parameters' cell"
  # A short run in a temporary workdir; everything else as a user runs it.
  params[0].source += f"\nWORKDIR = {str(tmp_path / 'run')!r}\nSTEPS = 4\n"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  client.execute()

  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  # The loss is plotted (matplotlib's inline PNG), and no TqdmWarning (IProgress not found, without ipywidgets).
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no plot"
  assert "TqdmWarning" not in "\n".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
  assert "held-out queries" in text and "top-1" in text   # retrieval ran
  assert "cosine(q, doc1)" in text                          # encode ran
  assert os.path.isdir(tmp_path / "run" / "hf")             # the run exported
  # The notebook never ran from scratch in the repository itself.
  assert not os.path.exists(os.path.join(ROOT, "notebooks", "runs"))
