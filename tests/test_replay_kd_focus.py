"""objective.replay_kd_focus in a real stage: the replay rows' KD weights are logged."""

import jax

from cpt_jax import stages
from cpt_jax.train import metrics as metrics_lib
from tests.helpers import one_device_config, write_corpus


def test_a_stage_logs_row_weights_inside_zero_to_two(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")
  stages.train(one_device_config(corpus, **{"train.steps": 4}), str(tmp_path / "m"),
               devices=jax.devices()[:1])
  c = one_device_config(corpus, **{"objective.replay_kd": 2.0,
                                   "objective.replay_kd_focus": 4.0,
                                   "train.init_checkpoint": str(tmp_path / "m"),
                                   "train.steps": 6})
  stages.train(c, str(tmp_path / "cpt"), devices=jax.devices()[:1])
  records = metrics_lib.read_metrics(tmp_path / "cpt")
  mean_w = [r["replay_kd_row_weight"] / r["replay_kd_rows"] for r in records
            if r.get("replay_kd_rows")]
  assert mean_w and all(0.0 < w < 2.0 for w in mean_w)
  # The student drifts from M on the old rows as it learns T: no row keeps weight 1 exactly.
  assert any(abs(w - 1.0) > 1e-4 for w in mean_w)
