"""Installs: what a plain run loads, the pins CI installs with, the README's install lines.

torch never loads in the project's own processes (TensorFlow, then torch, then transformers
segfaults: issue 21). TensorFlow should load only where seqio, TFDS or TFRecords are used;
a run's TensorBoard writer writes local event files without it (metrics.LocalEventFile).
"""

import json
import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import NO_TORCH_HERE, REPO

HEAVY = ("tensorflow", "tensorflow_datasets", "seqio", "torch", "transformers", "triton")

# A fresh interpreter: the plain run's imports and an HF folder written and read back;
# with "run", also `python -m cpt_jax.main` started from that folder and
# `python -m cpt_jax.export` of the run. Prints the heavy modules loaded.
PLAIN_RUN = textwrap.dedent("""
    import json, pathlib, sys
    from absl import app
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import cpt_jax.main, cpt_jax.run, cpt_jax.stages, cpt_jax.train.trainer
    from cpt_jax import export
    from cpt_jax.model import hf
    from cpt_jax.model.transformer import ModelConfig, Transformer
    from tests.helpers import write_corpus
    {extra_import}
    work, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    hf_dir = str(work / "hf")
    cfg = ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
                      ["params"])
    hf.save_hf(params, cfg, hf_dir)
    hf.load_hf_params(hf_dir, cfg)
    if mode == "run":
      sys.argv = ["cpt_jax.main", "--config=configs/tiny.py", f"--workdir={{work / 'run'}}",
                  f"--config.data.corpus_dir={{write_corpus(work / 'corpus')}}",
                  "--config.data.new=alpha", "--config.data.replay=beta,gamma",
                  "--config.data.seq_len=32", "--config.train.steps=2",
                  "--config.train.log_every=1", "--config.train.checkpoint_every=2",
                  "--config.train.progress_bar=False", "--config.data.prefetch=0",
                  f"--config.train.init_from_hf={{hf_dir}}"]
      try:
        app.run(cpt_jax.main.main)  # what `python -m cpt_jax.main` runs
      except SystemExit as e:
        assert not e.code, e.code
      export.main(["--checkpoint", str(work / "run"), "--out", str(work / "out"),
                   "--like", hf_dir])
      assert (work / "out" / "config.json").is_file()
    print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
""")


def _heavy_loaded(tmp_path, mode, extra_import=""):
  script = PLAIN_RUN.format(extra_import=extra_import, heavy=HEAVY)
  res = subprocess.run([sys.executable, "-c", script, str(tmp_path), mode], cwd=REPO,
                       capture_output=True, text=True, timeout=900, check=False)
  assert res.returncode == 0, res.stderr[-6000:]
  return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(name="after_a_run", scope="module")
def _after_a_run(tmp_path_factory):
  pytest.importorskip("safetensors", reason="the hf extra: pip install -e '.[hf]'")
  return _heavy_loaded(tmp_path_factory.mktemp("plain_run"), "run")


def test_the_plain_run_imports_and_hf_import_export_load_neither_tensorflow_nor_torch(tmp_path):
  pytest.importorskip("safetensors", reason="the hf extra: pip install -e '.[hf]'")
  assert _heavy_loaded(tmp_path, "imports") == []


def test_the_check_sees_tensorflow_when_it_loads(tmp_path):
  """The check above can fail: the same imports plus `import seqio` report TensorFlow."""
  pytest.importorskip("safetensors", reason="the hf extra: pip install -e '.[hf]'")
  loaded = _heavy_loaded(tmp_path, "imports", "import seqio")
  assert {"seqio", "tensorflow"} <= set(loaded), loaded


def test_a_plain_run_and_its_export_load_no_torch(after_a_run):
  assert not set(after_a_run) & {"torch", "transformers", "triton", "seqio"}, after_a_run


def test_a_plain_run_loads_no_tensorflow(after_a_run):
  assert after_a_run == []


@pytest.mark.parametrize("name", NO_TORCH_HERE)
def test_the_test_process_refuses_torch(name):
  with pytest.raises(ImportError, match="issue 21"):
    __import__(name)
  assert name not in sys.modules


# ---------------------------------------------------------------- pins and install lines


def _extras():
  tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
  return tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]


def _pip_installs(text):
  """(extras, other arguments) of every `pip install -e ".[...]"` command in `text`."""
  found = []
  for m in re.finditer(r"pip install ([^\n`]*?)-e \"\.\[([\w,-]+)\]\"([^\n`#]*)", text):
    found.append((m.group(2).split(","), (m.group(1) + m.group(3)).split()))
  return found


def test_ci_installs_the_pins_and_runs_the_readme_test_command():
  readme = (REPO / "README.md").read_text()
  ci = (REPO / ".ci" / "run").read_text()
  test_cmd = re.search(r"^(python -m pytest[^#\n]*?)\s+# the tests \(\.ci/run\)", readme, re.M)
  assert test_cmd, "README's three commands lost the test command"
  for job in (ci, (REPO / ".ci" / "latest").read_text()):
    lines = [l for l in job.splitlines() if l.strip() and not l.startswith("#")]
    assert lines[-1].replace("python3 ", "python ") == test_cmd.group(1)
  (extras, args), = _pip_installs(ci)
  assert " ".join(args).endswith("-c constraints.txt"), args
  assert set(extras) == set(_extras())  # every extra, pinned
  assert "pip install -c constraints.txt -e \".[" + ",".join(extras) + "]\"" in readme


def test_readme_install_lines_name_existing_extras():
  readme = (REPO / "README.md").read_text()
  installs = _pip_installs(readme)
  assert len(installs) >= 4, installs
  named = {e for extras, _ in installs for e in extras}
  assert named <= set(_extras()), named - set(_extras())
  assert {"dev", "hf", "parity"} <= named


def test_readme_jax_accelerator_extras_exist_in_jax():
  """`jax[cuda12]` / `jax[cuda13]` / `jax[tpu]` in the README are extras jax declares."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  declared = set(importlib.metadata.metadata("jax").get_all("Provides-Extra"))
  readme = (REPO / "README.md").read_text()
  named = set(re.findall(r"\"jax\[([\w-]+)\]", readme))
  assert {"tpu"} <= named and any(n.startswith("cuda") for n in named), named
  assert named <= declared, named - declared


def test_constraints_pin_every_dependency_once():
  pins = {}
  for line in (REPO / "constraints.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
      continue
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([\w.+!-]+)", line)
    assert m, f"constraints.txt: {line!r} is not NAME==VERSION"
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    assert name not in pins, f"constraints.txt pins {name} twice"
    pins[name] = m.group(2)
  for name in ("jax", "jaxlib", "flax", "orbax-checkpoint", "seqio", "tensorflow", "torch",
               "transformers", "safetensors", "numpy", "pytest"):
    assert name in pins, f"constraints.txt does not pin {name}"


def test_constraints_script_pins_the_installed_closure_only():
  """`python .ci/constraints.py`: installed versions of what the project needs, no more."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  pytest.importorskip("tomllib", reason="Python 3.11+")
  res = subprocess.run([sys.executable, str(REPO / ".ci" / "constraints.py"), "--extras", "dev"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  pins = dict(l.split("==") for l in res.stdout.splitlines() if not l.startswith("#"))
  for name in ("jax", "jaxlib", "flax", "seqio", "tensorflow", "pytest", "import-linter"):
    assert pins[name] == importlib.metadata.version(name).split("+")[0], name
  assert "pip" not in pins  # installed everywhere, needed by nothing here
  assert "torch" not in pins and "safetensors" not in pins  # not in .[dev]'s closure
  bad = subprocess.run([sys.executable, str(REPO / ".ci" / "constraints.py"), "--extras",
                        "dev,gpu"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       check=False)
  assert bad.returncode != 0 and "['gpu'] not in pyproject.toml" in bad.stderr


def test_latest_job_refuses_to_clear_a_folder_that_is_not_a_virtualenv(tmp_path):
  (tmp_path / "keep.txt").write_text("mine")
  res = subprocess.run(["bash", str(REPO / ".ci" / "latest"), str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60, check=False)
  assert res.returncode == 2 and "not a virtualenv" in res.stderr, res.stderr
  assert (tmp_path / "keep.txt").read_text() == "mine"
