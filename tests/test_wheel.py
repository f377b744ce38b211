"""The wheel: configs ship inside it, the `cpt-jax` console script and the quickstart notebook
run outside the checkout.

Builds the wheel once (`pip wheel --no-deps`), installs it with `--no-deps` into a fresh
venv on top of this interpreter's packages (no downloads; an editable install of the
checkout stays out of it), and
from a folder outside the checkout runs `cpt-jax --config=tiny` and executes the notebook
with a kernel of that venv. The notebook's install cell is run in a second venv without the
project, with `CPT_JAX_SOURCE` set to the wheel as a user would set it.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import venv

import pytest

from tests import helpers
from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


@pytest.fixture(name="wheel", scope="module")
def _wheel(tmp_path_factory):
  dist = tmp_path_factory.mktemp("dist")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(dist), str(REPO)], check=True, timeout=600, cwd=dist)
  return next(dist.glob("cpt_jax-*.whl"))


def _venv(folder):
  """A venv that sees this interpreter's packages but not an editable install of cpt_jax.

  `--system-site-packages` would also run the site folders' .pth files, and an editable
  install's .pth puts the checkout (or an import hook that finds it) before the venv's own
  packages. A .pth of the venv lists those folders instead: their packages without their
  .pth files.
  """
  venv.create(folder, system_site_packages=False, with_pip=False)
  py = folder / "bin" / "python"
  own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True).stdout.strip()
  here = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
  pathlib.Path(own, "_outer_site_packages.pth").write_text("\n".join(here) + "\n")
  return py


@pytest.fixture(name="installed", scope="module")
def _installed(tmp_path_factory, wheel):
  """(venv folder, its python, a folder outside the checkout): the wheel installed there."""
  root = tmp_path_factory.mktemp("wheel_venv")
  py = _venv(root / "venv")
  subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                  "-q", str(wheel)], check=True, timeout=600, env=_outside_env())
  outside = root / "elsewhere"
  outside.mkdir()
  return root / "venv", py, outside


def _outside_env():
  """This environment without the checkout on PYTHONPATH; one CPU device."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env["XLA_FLAGS"] = ""
  return env


def test_wheel_installs_and_cpt_jax_runs_a_packaged_config_outside_the_checkout(installed,
                                                                                 tmp_path):
  env_dir, py, outside = installed
  env = _outside_env()
  where = subprocess.run([str(py), "-c", "import cpt_jax, cpt_jax.configs as c; "
                          "print(cpt_jax.__file__); print(c.DIR)"],
                         capture_output=True, text=True, cwd=outside, env=env, check=False)
  assert str(env_dir) in where.stdout, where.stderr[-3000:]  # the wheel, not a checkout
  corpus = helpers.write_corpus(tmp_path / "corpus")
  proc = subprocess.run(
      [str(env_dir / "bin" / "cpt-jax"), "--config=tiny", f"--workdir={outside / 'run'}",
       "--config.train.steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
       f"--config.data.corpus_dir={corpus}", "--config.data.new=alpha",
       "--config.data.replay=beta", "--config.data.seq_len=32", "--config.train.progress_bar=false"],
      capture_output=True, text=True, cwd=outside, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = (outside / "run" / "metrics.jsonl").read_text().splitlines()
  assert json.loads(records[-1])["step"] == 2


def _execute(nb, py, cwd, kernels, monkeypatch, timeout=900):
  """Executes `nb` with a kernel running `py`, from `cwd`, outside the checkout."""
  nbclient = pytest.importorskip("nbclient")
  spec = kernels / "kernels" / "cpt-wheel"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [str(py), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "cpt_jax wheel", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(kernels))
  for key, value in _outside_env().items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("PYTHONPATH", raising=False)
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name="cpt-wheel",
                          resources={"metadata": {"path": str(cwd)}}).execute()
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))


def _where_cell(nbformat):
  return nbformat.v4.new_code_cell("import cpt_jax; print('cpt_jax from', cpt_jax.__file__)")


def test_the_notebook_runs_from_the_wheel_outside_the_checkout(installed, tmp_path,
                                                               monkeypatch):
  """Every cell, with the wheel's venv as the kernel: the install cell sees cpt_jax
  installed and does nothing; the demo's configs come from the package."""
  nbformat = pytest.importorskip("nbformat")
  env_dir, py, outside = installed
  monkeypatch.setenv("CPT_NOTEBOOK_QUICK", "1")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(_where_cell(nbformat))
  out = _execute(nb, py, outside, tmp_path / "jupyter", monkeypatch)
  assert f"cpt_jax from {env_dir}" in out, out[-3000:]
  assert "backward transfer" in out
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_the_install_cell_installs_cpt_jax_source_into_a_kernel_without_it(wheel, tmp_path,
                                                                           monkeypatch):
  """A venv without the project: the first cell stops with its message while CPT_JAX_SOURCE
  is empty, and installs the wheel it names once it is set."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  py = _venv(tmp_path / "bare")
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  install = nb.cells[1]
  source = install.source
  install.source = _set_source(source, "")
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="set CPT_JAX_SOURCE"):
    _execute(nbformat.v4.new_notebook(cells=[install]), py, outside, tmp_path / "k1",
             monkeypatch)
  install.source = _set_source(source, str(wheel))
  out = _execute(nbformat.v4.new_notebook(cells=[install, _where_cell(nbformat)]), py, outside,
                 tmp_path / "k2", monkeypatch)
  assert f"cpt_jax from {tmp_path / 'bare'}" in out, out[-3000:]


SOURCE_LINE = re.compile(r'^CPT_JAX_SOURCE = "([^"\n]*)"', re.M)


def _set_source(cell_source, value):
  """The install cell with CPT_JAX_SOURCE set to `value`, as a user sets it."""
  assert len(SOURCE_LINE.findall(cell_source)) == 1, "one CPT_JAX_SOURCE = \"...\" line"
  return SOURCE_LINE.sub(lambda _: f"CPT_JAX_SOURCE = {json.dumps(value)}", cell_source)


def test_colab_badge_and_install_source_follow_the_declared_repository_url():
  """pyproject's [project.urls] Repository is the one place for the public URL: with it, the
  README's Colab badge opens this repository's notebook and CPT_JAX_SOURCE defaults to it;
  without it, neither holds a made-up URL."""
  tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
  url = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get(
      "urls", {}).get("Repository", "")
  readme = (REPO / "README.md").read_text()
  nbformat = pytest.importorskip("nbformat")
  source, = SOURCE_LINE.findall(nbformat.read(NOTEBOOK, as_version=4).cells[1].source)
  badges = re.findall(r"\(https://colab\.research\.google\.com/github/([^)\s]+)\)", readme)
  assert not re.search(r"OWNER|<owner>|example\.com", readme + source)
  if not url:
    assert not badges and not source, (
        "a Colab badge or a default CPT_JAX_SOURCE needs [project.urls] Repository in "
        "pyproject.toml")
    return
  repo = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?", url)
  assert repo, f"[project.urls] Repository {url!r}: expected https://github.com/OWNER/NAME"
  assert badges == [f"{repo.group(1)}/blob/main/notebooks/quickstart.ipynb"], (
      "under the README's title: [![Open In Colab](https://colab.research.google.com/assets/"
      f"colab-badge.svg)](https://colab.research.google.com/github/{repo.group(1)}/blob/main/"
      "notebooks/quickstart.ipynb)")
  assert source == f"git+{url}", f'the install cell: CPT_JAX_SOURCE = "git+{url}"'
