"""Strategy 'steered': refreshes from the replay rows' training loss, at zero extra FLOPs."""

import jax
import numpy as np
import pytest

from cpt_jax import stages
from cpt_jax.replay import steer
from cpt_jax.replay import strategies
from tests import test_replay_quota
from tests.helpers import tiny_config


def test_loss_rise_from_a_hand_made_history():
  # b's replayed rows: 2.0 -> 2.6 (+0.6); a's: 3.0 -> 2.9 (-0.1); c seen only once later.
  rise = steer.loss_rise({"a": 3.0, "b": 2.0}, {"a": 2.9, "b": 2.6, "c": 1.0})
  assert rise == pytest.approx({"a": -0.1, "b": 0.6})
  # Averaged with the last estimate: b (0.6 + 0.2) / 2.
  assert steer.loss_rise({"b": 2.0}, {"b": 2.6}, {"b": 0.2}) == pytest.approx({"b": 0.4})


def test_refresh_moves_rows_to_the_rising_domain_and_rotates_the_oldest():
  buffers = {"a": np.array([10, 11, 12, 13]), "b": np.array([5, 6, 7, 8])}
  ages = {"a": np.array([0, 3, 1, 2]), "b": np.array([2, 0, 0, 1])}
  fresh = {"a": np.array([20, 21]), "b": np.array([30, 31, 32])}
  # b's loss rose: it grows to 6 rows, a shrinks to 2 and drops its two oldest (11, 13).
  rows, age, swapped = steer.refresh_rows(buffers, ages, fresh, {"a": 2, "b": 6}, 0.0)
  np.testing.assert_array_equal(rows["a"], [10, 12])
  np.testing.assert_array_equal(age["a"], [1, 2])
  np.testing.assert_array_equal(rows["b"], [5, 6, 7, 8, 30, 31])
  np.testing.assert_array_equal(age["b"], [3, 1, 1, 2, 0, 0])
  assert swapped == 0
  # Same sizes, swap 0.5: each domain's 2 oldest rows give way to fresh ones.
  rows, age, swapped = steer.refresh_rows(buffers, ages, fresh, {"a": 4, "b": 4}, 0.5)
  np.testing.assert_array_equal(rows["a"], [10, 12, 20, 21])  # 11 (age 3), 13 (2) out
  np.testing.assert_array_equal(rows["b"], [6, 7, 30, 31])  # 5 (age 2), 8 (1) out
  np.testing.assert_array_equal(age["b"], [1, 1, 0, 0])
  assert swapped == 4


def _config(corpus, tmp_path, init):
  c = tiny_config()
  c.data.update(corpus_dir=str(corpus), cache_dir=str(tmp_path / "cache"))
  c.sharding.mesh_shape = (1, 1, 1)
  c.train.update(steps=8, log_every=2, checkpoint_every=4, eval_batches=1, init_checkpoint=init)
  c.optimizer.lr = 1e-1  # a large step on alpha: beta's and gamma's rows get worse
  c.replay.update(strategy="steered", fraction=0.25, online_every=2, online_swap=0.25,
                  steer_quota=1.0)
  return c


def test_steered_run_spends_no_selection_flops_steers_and_resumes(tmp_path):
  corpus, ckpt = test_replay_quota.train_forgetting_m(tmp_path)
  c = _config(corpus, tmp_path, ckpt)
  ref = stages.train(c, str(tmp_path / "ref"), devices=jax.devices()[:1])
  sel = ref["selection"]
  st = sel["steered"]
  assert st["refreshes"] == 3 and st["swaps"] > 0
  # Zero extra FLOPs: nothing scored, and the stage's accounting says so.
  assert sel["tflops"] == 0.0 and sel["run_tflops"] == 0.0 and sel["tokens"] == 0
  assert sel["actual"]["selection_share"] == 0.0
  assert sel["planned"]["tflops"]["selection"] == 0.0
  # The loss history came from the log records, and the quota followed its rise.
  assert set(st["first"]) == set(st["last"]) == set(st["rise"]) == {"beta", "gamma"}
  rows = {d: len(v) for d, v in st["ages"].items()}
  # The buffer started at the pool shares (online_init 'proportional'); the domain whose
  # replayed rows' loss rose most (per row, weighted by its pool) ends with more rows.
  more, _ = test_replay_quota.check_buffer_moved(c, ref, tmp_path, rows, st["rise"],
                                                 "steered", strategies.split_quota)
  assert st["rise"][more] > 0
