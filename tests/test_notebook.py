"""notebooks/sample.ipynb: valid nbformat 4, and its code cells run in order (shell `!` / `%` lines
skipped, one namespace) against a trained work directory, ending with uint8 images.

The default test points WORKDIR at the tiny pipeline of tests/tiny_workdir.py (built once per
session, shared with tests/test_api.py); the slow one at the runlocal demo."""

import json
import os

import numpy as np
import pytest

from tiny_workdir import runlocal_demo, tiny_pipeline

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks",
                        "sample.ipynb")


def _load():
  with open(NOTEBOOK) as f:
    return json.load(f)


def _python(source_lines) -> str:
  """A code cell's source with IPython shell / magic lines (`!`, `%`) replaced by `pass` at their
  indentation, so that blocks around them stay valid Python."""
  out = []
  for line in "".join(source_lines).splitlines():
    stripped = line.lstrip()
    out.append(line[:len(line) - len(stripped)] + "pass" if stripped[:1] in ("!", "%") else line)
  return "\n".join(out) + "\n"


def run_notebook(workdir, cwd, monkeypatch) -> dict:
  """Executes every code cell in order in one namespace with VQKD_WORKDIR=workdir, in `cwd`."""
  monkeypatch.setenv("VQKD_WORKDIR", str(workdir))
  monkeypatch.chdir(cwd)
  namespace = {"__name__": "__main__"}
  for i, cell in enumerate(_load()["cells"]):
    if cell["cell_type"] == "code":
      exec(compile(_python(cell["source"]), f"sample.ipynb[cell {i}]", "exec"), namespace)
  return namespace


def test_notebook_is_nbformat_4():
  nb = _load()
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
  assert nb["metadata"]["kernelspec"]["language"] == "python"
  kinds = [c["cell_type"] for c in nb["cells"]]
  assert set(kinds) <= {"code", "markdown"} and kinds.count("code") == 4
  for cell in nb["cells"]:
    assert isinstance(cell["source"], list) and isinstance(cell["metadata"], dict)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  # The install cell is guarded by "is vqkd_jax importable"; the next sets WORKDIR.
  assert 'find_spec("vqkd_jax") is None' in "".join(code[0]["source"])
  assert 'WORKDIR = os.environ.get("VQKD_WORKDIR", "runs/demo")' in "".join(code[1]["source"])
  assert "Generator.from_checkpoint(WORKDIR" in "".join(code[2]["source"])


def test_shell_lines_are_skipped():
  src = ["if x:\n", "  !pip install foo\n", "%matplotlib inline\n", "y = 1"]
  assert _python(src) == "if x:\n  pass\npass\ny = 1\n"


def _check(namespace, cwd):
  images, labels = namespace["images"], namespace["labels"]
  assert images.dtype == np.uint8 and images.shape == (len(labels), 32, 32, 3)
  assert len(labels) == namespace["PER_CLASS"] * len(namespace["CLASSES"]) == 32
  assert namespace["gen"].kind == "ar"
  # Without IPython the last cell writes the grid: 8 rows x 4 columns of 32 px, upscaled 4x.
  if "display" not in namespace:
    from PIL import Image
    with Image.open(cwd / "samples.png") as im:
      assert im.size == (4 * (4 * 34 + 2), 4 * (8 * 34 + 2))


def test_notebook_runs_on_a_tiny_pipeline(tmp_path_factory, tmp_path, monkeypatch):
  workdir = tiny_pipeline(tmp_path_factory)
  namespace = run_notebook(workdir, tmp_path, monkeypatch)
  _check(namespace, tmp_path)


@pytest.mark.slow
def test_notebook_runs_on_the_runlocal_demo(tmp_path_factory, tmp_path, monkeypatch):
  """Minutes: the runlocal demo (shared with tests/test_api.py's slow test in one session)."""
  workdir = runlocal_demo(tmp_path_factory)
  namespace = run_notebook(workdir, tmp_path, monkeypatch)
  _check(namespace, tmp_path)
