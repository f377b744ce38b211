"""replay.ramp: the replay share moves over the stage at the same replay tokens."""

import jax
import numpy as np
import pytest

from cpt_jax import config as config_lib
from cpt_jax import stages
from cpt_jax.replay import planner
from cpt_jax.train import metrics as metrics_lib
from tests.helpers import crash_then_resume, one_device_config, tiny_config, write_corpus


@pytest.mark.parametrize("steps,every", [(404, 50), (10, 3), (7, 7), (100, 1), (9, 4)])
@pytest.mark.parametrize("q", [1.0, -1.0, 0.4])
def test_the_share_keeps_its_mean_and_moves_one_way(steps, every, q):
  p = 0.01
  s = np.array([planner.ramp_share(p, q, i, steps, every) for i in range(steps)])
  assert s.mean() == pytest.approx(p, rel=1e-12)  # the same replay tokens as a flat share
  assert (s >= (1 - abs(q)) * p - 1e-15).all() and (s <= (1 + abs(q)) * p + 1e-15).all()
  d = np.diff(s)
  assert ((d >= 0) if q > 0 else (d <= 0)).all()
  assert len(np.unique(s)) == -(-steps // every)  # constant inside each segment
  if steps > every:
    assert (s[-1] - s[0]) * q > 0
  assert all(planner.ramp_share(p, 0.0, i, steps, every) == p for i in range(steps))


def _config(corpus, **kw):
  return one_device_config(corpus, **{
      "train.steps": 16, "train.log_every": 4, "train.checkpoint_every": 8,
      "replay.strategy": "random", "replay.fraction": 0.4, "replay.ramp_every": 4, **kw})


def _replay_rows_per_window(workdir):
  """Replay rows each log window drew (from the data stats' cumulative row counts)."""
  recs = [r for r in metrics_lib.read_metrics(workdir) if "data" in r]
  cum = [sum(v for d, v in r["data"]["rows_per_domain"].items() if d in ("beta", "gamma"))
         for r in recs]
  return np.diff([0] + cum)


def test_a_run_replays_late_as_often_as_a_flat_one_in_all_and_resumes_on_the_ramp(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")
  flat = stages.train(_config(corpus), str(tmp_path / "flat"), devices=jax.devices()[:1])
  up = stages.train(_config(corpus, **{"replay.ramp": 1.0}), str(tmp_path / "up"),
                    devices=jax.devices()[:1])
  down = stages.train(_config(corpus, **{"replay.ramp": -1.0}), str(tmp_path / "down"),
                      devices=jax.devices()[:1])
  n_flat, n_up, n_down = (_replay_rows_per_window(tmp_path / k) for k in ("flat", "up", "down"))
  # 16 steps of 8 rows, share 0.4 / 1.4: 36.6 replay rows in every case, in 4 windows.
  assert abs(n_up.sum() - n_flat.sum()) <= 2 and abs(n_down.sum() - n_flat.sum()) <= 2
  # A linear ramp from 0 to twice the share: windows of 1, 3, 5 and 7 sixteenths of it.
  lin = n_flat.sum() * np.array([1, 3, 5, 7]) / 16
  np.testing.assert_allclose(n_up, lin, atol=1.5)
  np.testing.assert_allclose(n_down, lin[::-1], atol=1.5)
  assert n_flat.max() - n_flat.min() <= 2
  assert flat["data"]["tokens_per_role"]["new"] > 0
  # A resume from the step-8 checkpoint continues the same ramp, batch for batch.
  crash_then_resume(_config(corpus, **{"replay.ramp": 1.0}), tmp_path / "resumed", step=8)
  got = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(tmp_path / "resumed")}
  ref = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(tmp_path / "up")}
  assert sorted(got) == sorted(ref) == [4, 8, 12, 16]
  for s in (12, 16):
    assert got[s] == pytest.approx(ref[s], abs=1e-6), s
  np.testing.assert_array_equal(_replay_rows_per_window(tmp_path / "resumed"), n_up)


@pytest.mark.parametrize("kw,match", [
    ({"replay.ramp": 1.5}, r"replay.ramp=1.5 must be in \[-1, 1\]"),
    ({"replay.ramp": 1.0, "replay.strategy": ""}, r"replay.ramp=1.0 moves the share .* "
     r"replay.strategy=''"),
    ({"replay.ramp": 1.0, "replay.ramp_every": 0}, r"replay.ramp_every=0 must be an int >= 1"),
    ({"replay.ramp": 0.5, "mixing.controller": "exp3"},
     r"replay.ramp=0.5 .* mixing.controller='exp3'"),
])
def test_bad_ramps_are_named(kw, match):
  c = tiny_config(**{"replay.strategy": "random", **kw})
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(c, 1, 1)


def test_a_ramp_that_would_fill_the_batch_is_refused_before_the_first_step(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")
  c = _config(corpus, **{"replay.fraction": 1.0, "replay.ramp": 1.0})  # share 0.5 -> 1.0
  with pytest.raises(ValueError, match=r"replay.ramp=1.0: the replay share 0.5 would reach 1"):
    stages.train(c, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert not metrics_lib.read_metrics(tmp_path / "run")
