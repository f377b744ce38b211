"""`python -m cpt_jax.main`: a user error is one `error: ...` line and exit status 2.

On the code before this, an unknown key printed a 56-line traceback (exit 1), a bad value
absl's two-line "FATAL Flags parsing error" (exit 1), and a bad setting, missing data, a
changed config or a locked workdir their traceback (exit 1): every case below failed.
"""

import os

import numpy as np
import pytest

from cpt_jax import config as config_lib
from cpt_jax import main as main_lib
from cpt_jax.train import workdir as workdir_lib
from tests.helpers import one_device_config
from tests.helpers import run_cli as cli
from tests.helpers import train_one_device
from tests.helpers import write_cli_config
from tests.helpers import write_corpus

def _error_line(stderr: str) -> str:
  """The one `error:` line, after asserting there is no traceback."""
  assert "Traceback" not in stderr, stderr
  lines = [l for l in stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, stderr
  return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  corpus = write_corpus(tmp / "corpus")
  return tmp, corpus, write_cli_config(tmp, corpus, **{"train.steps": 2})


@pytest.mark.parametrize("args, expect", [
    (["--config.train.stepz=3"],
     "error: --config.train.stepz=3: unknown config key 'train.stepz' (did you mean "
     "'train.steps'?)"),
    (["--config.optimizer.lr=fast"], "error: flag --config.optimizer.lr=fast: "),
    (["--config.train.steps=-1"], "error: train.steps=-1 must be >= 1"),
    (["--config.data.corpus_dir=/nonexistent/corpus"],
     "error: corpus directory '/nonexistent/corpus' does not exist"),
    (["--config.train.init_checkpoint=/nonexistent/run"],
     "error: train.init_checkpoint: no checkpoint folder at /nonexistent/run"),
], ids=["unknown_key", "bad_value", "rejected_value", "missing_corpus", "missing_init"])
def test_a_user_error_is_one_line_and_status_2(setup, tmp_path, args, expect):
  _, _, config = setup
  status, _, err = cli(config, tmp_path / "run", *args)
  assert status == 2, err
  assert _error_line(err).startswith(expect), err


def test_missing_data_changed_config_and_locked_workdir(setup, tmp_path):
  tmp, corpus, config = setup
  # A missing validation split: named before the first step, nothing trained.
  bad = write_corpus(tmp_path / "corpus")
  (bad / "beta" / "validation.jsonl").unlink()
  status, _, err = cli(write_cli_config(tmp_path, bad, **{"train.steps": 2}), tmp_path / "missing")
  assert status == 2 and str(bad / "beta" / "validation.jsonl") in _error_line(err), err
  assert not (tmp_path / "missing" / "checkpoints").exists() or not os.listdir(
      tmp_path / "missing" / "checkpoints")
  # A changed config on a rerun of a finished run (ConfigChangedError).
  train_one_device(one_device_config(corpus, **{"train.steps": 2}), tmp_path / "done")
  status, _, err = cli(config, tmp_path / "done", "--config.optimizer.lr=0.0011")
  line = _error_line(err)
  assert status == 2 and "optimizer.lr: 0.003 -> 0.0011" in line, err
  # A workdir another run holds (WorkdirLockedError).
  lock = workdir_lib.WorkdirLock(str(tmp_path / "done"), 30).acquire()
  try:
    status, _, err = cli(config, tmp_path / "done")
    assert status == 2 and "is in use by another run" in _error_line(err), err
    # --traceback (or CPT_JAX_TRACEBACK=1) keeps the traceback of a user error.
    status, _, err = cli(config, tmp_path / "done", env={"CPT_JAX_TRACEBACK": "1"})
    assert status == 1 and "Traceback" in err and "WorkdirLockedError" in err
  finally:
    lock.release()
  status, _, err = cli(config, tmp_path / "x", "--config.train.stepz=3", "--traceback")
  assert status == 1 and "Traceback" in err


def test_only_the_project_s_own_errors_are_user_errors():
  """A ValueError cpt_jax raises is a user's; one raised inside numpy (or the tests) is a
  bug and keeps its traceback."""
  c = config_lib.default_config()
  c.train.steps = 0
  with pytest.raises(ValueError) as ours:
    config_lib.validate_config(c)
  assert main_lib.is_user_error(ours.value)
  with pytest.raises(ValueError) as theirs:
    np.reshape(np.zeros(3), (2, 2))
  assert not main_lib.is_user_error(theirs.value)
  assert main_lib.is_user_error(workdir_lib.WorkdirLockedError("held"))
  assert not main_lib.is_user_error(KeyError("x"))
