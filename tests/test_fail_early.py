"""What will fail later fails before the first step: data splits, warm-start shapes, budgets.

Each test here failed on the code before these checks: a missing validation split was found
at the final evaluation (after training), a warm start of another width said only
"Requested shape ... is not compatible with stored shape ...", and a `replay.max_tflops`
below the first log window ran a window, stopped and returned normally.
"""

import os

import jax
import pytest

from cpt_jax.data import sources as sources_lib
from cpt_jax.model.transformer import ModelConfig
from cpt_jax.model.transformer import flops_per_token
from cpt_jax.train import checkpoint as ckpt_lib
from cpt_jax.train import metrics as metrics_lib
from tests.helpers import one_device_config as _config
from tests.helpers import train_one_device as _train
from tests.helpers import write_corpus


@pytest.fixture
def corpus(tmp_path):
  return write_corpus(tmp_path / "corpus")


def _nothing_trained(workdir):
  assert not os.path.exists(workdir / "metrics.jsonl") or not metrics_lib.read_metrics(workdir)
  assert not (workdir / "checkpoints").exists() or not ckpt_lib.Checkpointer(
      str(workdir / "checkpoints")).all_steps()


@pytest.mark.parametrize("damage", ["missing", "empty", "folder"])
def test_a_missing_validation_split_fails_before_the_first_step(corpus, tmp_path, damage):
  path = corpus / "gamma" / "validation.jsonl"  # gamma: a replay domain, trains on train
  path.unlink()
  if damage == "empty":
    path.write_bytes(b"")
  elif damage == "folder":
    path.mkdir()
  with pytest.raises(sources_lib.DataError) as err:
    _train(_config(corpus, **{"train.steps": 2, "train.checkpoint_every": 1}), tmp_path / "run")
  assert str(path) in str(err.value) and "'gamma'" in str(err.value)
  assert "validation" in str(err.value)
  _nothing_trained(tmp_path / "run")


def test_a_later_stage_s_missing_split_fails_before_the_first_stage(corpus, tmp_path):
  from cpt_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  write_corpus(corpus, domains=("delta",))
  (corpus / "delta" / "train.jsonl").unlink()
  config = _config(corpus, **{"train.steps": 2})
  config.stage_order = "one,two"
  config.stages.one = {"data": {"new": "alpha", "replay": ""}}
  config.stages.two = {"data": {"new": "delta", "replay": "alpha"}}
  with pytest.raises(sources_lib.DataError, match=r"'delta'.*missing split 'train'.*delta"):
    run_lib.run(config, str(tmp_path / "staged"), devices=jax.devices()[:1])
  assert not (tmp_path / "staged" / "stages").exists()


def test_a_warm_start_of_another_width_names_the_parameter_and_the_key(corpus, tmp_path):
  _train(_config(corpus, **{"train.steps": 2}), tmp_path / "src")
  wide = _config(corpus, **{"train.steps": 2, "model.d_model": 64,
                            "train.init_checkpoint": str(tmp_path / "src")})
  with pytest.raises(ckpt_lib.ParamsMismatchError) as err:
    _train(wide, tmp_path / "wide")
  msg = str(err.value)
  assert "train.init_checkpoint" in msg and "params/embed/embedding" in msg
  assert "(384, 32)" in msg and "(384, 64)" in msg
  assert "model.d_model=64 (the checkpoint's run: 32)" in msg
  assert "\n" not in msg
  _nothing_trained(tmp_path / "wide")
  # Without the source's config.json the keys whose value is a requested size are named.
  os.remove(tmp_path / "src" / "config.json")
  deep = _config(corpus, **{"train.steps": 2, "model.num_layers": 3,
                            "train.init_checkpoint": str(tmp_path / "src")})
  with pytest.raises(ckpt_lib.ParamsMismatchError, match=r"not in the checkpoint: layers_2/"):
    _train(deep, tmp_path / "deep")


@pytest.mark.parametrize("strategy", ["", "random"])
def test_a_cap_below_the_first_log_window_fails_before_training(corpus, tmp_path, strategy):
  config = _config(corpus, **{"train.steps": 4})
  per_step = (config.train.global_batch_size * config.data.seq_len * flops_per_token(
      ModelConfig.from_config(config.model), config.data.seq_len) / 1e12)
  config.replay.max_tflops = 1.5 * per_step  # log_every=2: the first window needs 2 steps
  config.replay.strategy = strategy
  with pytest.raises(ValueError, match=r"replay\.max_tflops=\S+ is below"):
    _train(config, tmp_path / "run")
  _nothing_trained(tmp_path / "run")


@pytest.mark.parametrize("bad, key", [
    ({"objective": {"kd_tokens": "forgoten"}}, "objective.kd_tokens='forgoten'"),
    ({"optimizer": {"schedule": "cosin"}}, "optimizer.schedule='cosin'"),
    ({"objective": {"replay_kd_ramp": 2.0}}, "objective.replay_kd_ramp=2.0")])
def test_a_later_stage_s_bad_setting_fails_before_the_first_stage(corpus, tmp_path, bad, key):
  """A staged run checks every stage's settings before the baseline or the first stage
  trains; the code before this check trained stage one to the end and then failed."""
  from cpt_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  config = _config(corpus, **{"train.steps": 2})
  config.stage_order = "one,two"
  config.stages.one = {"data": {"new": "alpha", "replay": ""}}
  config.stages.two = {"data": {"new": "beta", "replay": "alpha"}, **bad}
  with pytest.raises(ValueError) as err:
    run_lib.run(config, str(tmp_path / "staged"), devices=jax.devices()[:1])
  assert "stages.two" in str(err.value) and key in str(err.value)
  assert not (tmp_path / "staged" / "stages").exists()
  assert not (tmp_path / "staged" / "baseline.json").exists()
