"""The wheel: configs ship inside it and the `cpt-jax` console script runs outside the checkout.

Builds the wheel (`pip wheel --no-deps`), installs it with `--no-deps` into a fresh
venv on top of this interpreter's packages (`--system-site-packages`: no downloads),
and runs `cpt-jax --config=tiny` from a folder outside the checkout.
"""

import json
import os
import subprocess
import sys
import venv

from tests import helpers
from tests.conftest import REPO


def test_wheel_installs_and_cpt_jax_runs_a_packaged_config_outside_the_checkout(tmp_path):
  dist = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(dist), str(REPO)], check=True, timeout=600,
                 cwd=tmp_path)
  wheel = next(dist.glob("cpt_jax-*.whl"))
  env_dir = tmp_path / "venv"
  venv.create(env_dir, system_site_packages=True, with_pip=False)
  py = env_dir / "bin" / "python"
  subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                  "-q", str(wheel)], check=True, timeout=600)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env["XLA_FLAGS"] = ""
  where = subprocess.run([str(py), "-c", "import cpt_jax, cpt_jax.configs as c; "
                          "print(cpt_jax.__file__); print(c.DIR)"],
                         capture_output=True, text=True, cwd=outside, env=env, check=True)
  assert str(env_dir) in where.stdout, where.stdout  # the wheel, not a checkout
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
