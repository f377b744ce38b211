"""objective.replay_kd_ramp: the replay rows' KD weight moves linearly over the stage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax import config as config_lib
from cpt_jax import stages
from cpt_jax.train import context as context_lib
from cpt_jax.train import metrics as metrics_lib
from cpt_jax.train import objective, state as state_lib, step as step_lib
from tests.helpers import crash_then_resume, one_device_config, write_corpus
from tests.helpers import tiny_config

T = 11  # the stage's steps


def _losses(ramp: float, replay_kd: float, steps):
  """{step: loss} of one batch with replay rows, the teacher a perturbed copy."""
  c = tiny_config()
  c.objective.update(replay_kd=replay_kd, replay_kd_ramp=ramp)
  c.sharding.mesh_shape = (1, 1, 1)
  c.train.init_checkpoint = "teacher"  # only satisfies validation
  ctx = context_lib.build_context(c, jax.devices()[:1])
  params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, c.seed,
                                c.data.seq_len).params
  teacher = jax.tree.map(lambda x: x * 1.1 + 0.01, params)
  b = batch_lib.synthetic_batch(np.random.default_rng(0), 8, c.data.seq_len,
                                c.model.vocab_size, num_domains=2, docs_per_row=2)
  b["roles"] = np.array([batch_lib.NEW] * 5 + [batch_lib.REPLAY] * 3, np.int32)
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  batch["distill_index"] = jnp.asarray(step_lib.distill_index(
      b["roles"], 1, with_replay=True, with_distill=False)[0])
  loss_fn = objective.make_loss_fn(ctx.apply_fn, c.objective, 2, total_steps=T)
  out = {}
  for s in steps:
    norms = dict(objective.normalisers(batch), step=jnp.asarray(s, jnp.float32))
    out[s] = float(loss_fn(params, batch, {"teacher": teacher}, norms=norms)[0])
  return out


def test_the_ramp_runs_from_nothing_to_twice_the_weight_and_keeps_the_mean():
  steps = range(T)
  up = _losses(1.0, 2.0, steps)
  down = _losses(-1.0, 2.0, steps)
  flat = _losses(0.0, 2.0, [0])[0]
  none = _losses(0.0, 0.0, [0])[0]
  double = _losses(0.0, 4.0, [0])[0]
  assert none < flat < double
  assert up[0] == pytest.approx(none, rel=1e-6) and up[T - 1] == pytest.approx(double, rel=1e-6)
  assert down[0] == pytest.approx(double, rel=1e-6) and down[T - 1] == pytest.approx(none,
                                                                                    rel=1e-6)
  assert np.mean([up[s] for s in steps]) == pytest.approx(flat, rel=1e-6)
  assert all(up[s] < up[s + 1] for s in range(T - 1))


def test_ramp_out_of_range_is_refused():
  c = tiny_config()
  c.objective.update(replay_kd=1.0, replay_kd_ramp=1.5)
  c.train.init_checkpoint = "teacher"
  with pytest.raises(ValueError, match=r"objective.replay_kd_ramp=1.5 must be in \[-1, 1\]"):
    config_lib.validate_config(c, 1, 1)


def test_a_run_logs_the_rising_weight_and_resumes_on_the_same_ramp(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")
  base = one_device_config(corpus, **{"train.steps": 4})
  stages.train(base, str(tmp_path / "m"), devices=jax.devices()[:1])
  c = one_device_config(corpus, **{"objective.replay_kd": 2.0, "objective.replay_kd_ramp": 1.0,
                                   "train.init_checkpoint": str(tmp_path / "m")})
  crash_then_resume(c, tmp_path / "cpt", step=4)
  w = [r["replay_kd_weight"] for r in metrics_lib.read_metrics(tmp_path / "cpt")]
  # Log windows of 2 steps: the weight rises from 0 (step 0) to 4 (step 7).
  assert len(w) == 4 and all(a < b for a, b in zip(w, w[1:]))
  assert w[0] < 0.5 and w[-1] > 3.0
