"""Logs on pods (the progress bar only on a terminal, one line per log window otherwise)
and train.profile_steps (a jax.profiler trace in the workdir)."""

import io
import sys

import pytest

from cpt_jax import config as config_lib
from cpt_jax.schema import train as train_schema
from cpt_jax.train import hooks as hooks_lib
from tests import helpers


def test_progress_bar_only_on_a_terminal(monkeypatch):
  c = config_lib.default_config()
  assert c.train.progress_bar is True
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
  assert train_schema.resolve_progress_bar(c).train.progress_bar is False
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
  assert train_schema.resolve_progress_bar(c).train.progress_bar is True
  c.train.progress_bar = False
  assert train_schema.resolve_progress_bar(c).train.progress_bar is False


def test_progress_log_writes_one_line_per_window():
  out = io.StringIO()
  hook = hooks_lib.ProgressLog(200, stream=out)
  hook.on_log(40, {"loss": 2.31214, "learning_rate": 2.9e-4, "tokens_per_sec": 3482.2})
  hook.on_log(60, {"loss": 2.2, "learning_rate": 2.8e-4, "tokens_per_sec": 3500})
  lines = out.getvalue().splitlines()
  assert lines[0] == "step 40/200 (20%) loss 2.3121 lr 2.9e-04 3,482 tok/s"
  assert len(lines) == 2 and "\r" not in out.getvalue()


@pytest.mark.parametrize("spec", ["5", "a:b", "4:2", "-1:3"])
def test_bad_profile_steps_are_rejected_naming_the_key(spec):
  c = helpers.tiny_config()
  c.train.profile_steps = spec
  with pytest.raises(ValueError, match="train.profile_steps"):
    config_lib.validate_config(c)


def test_profile_steps_write_a_trace_into_the_workdir(tmp_path, capfd):
  corpus = helpers.write_corpus(tmp_path / "corpus")
  c = helpers.one_device_config(corpus, **{"train.steps": 4, "train.profile_steps": "1:3"})
  summary = helpers.train_one_device(c, tmp_path / "run")
  traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
  assert traces, "a jax.profiler trace (plugins/profile/<run>/*.xplane.pb)"
  assert summary["profile"] == {"profile_dir": str(tmp_path / "run" / "profile")}
  err = capfd.readouterr().err
  assert "step 4/4 (100%) loss" in err  # progress_bar=False: the one-line records
