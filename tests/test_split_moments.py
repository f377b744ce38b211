"""Separate optimizer moments for T's signal and the old one (optimizer.old_moments)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax import config as config_lib
from cpt_jax.train import context as context_lib
from cpt_jax.train import layout as layout_lib
from cpt_jax.train import objective, split_moments, state as state_lib, step as step_lib
from tests.helpers import crash_then_resume, one_device_config, tiny_config
from tests.helpers import train_one_device, write_corpus

B, STEPS = 8, 4
_MIXED = [batch_lib.NEW] * 6 + [batch_lib.REPLAY] * 2


def _config(old_moments="separate", **kw):
  c = tiny_config()
  c.train.global_batch_size = B
  c.optimizer.update(old_moments=old_moments, schedule="constant", warmup_steps=0,
                     clip_norm=0.0, eps=1e-12)
  c.sharding.mesh_shape = (1, 1, 1)
  c.train.init_checkpoint = "teacher"  # only satisfies validation: the test builds it
  for key, value in kw.items():
    group, name = key.split(".")
    c[group][name] = value
  return c


def _trajectory(config, roles=_MIXED):
  """The params after STEPS jitted steps on fixed batches; the teacher sits away from the
  start so that the replay rows' KD has a gradient."""
  config = config.copy_and_resolve_references()
  ctx = context_lib.build_context(config, jax.devices()[:1])
  layout = ctx.layout
  state = state_lib.init_state(ctx.model, layout, ctx.state_sh, config.seed,
                               config.data.seq_len)
  teacher = jax.tree.map(lambda p: p * 1.5, state.params)
  state = state.replace(frozen={"teacher": teacher})
  loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, 2, layout=layout)
  step = jax.jit(step_lib.make_train_step(loss_fn, layout))
  rng = np.random.default_rng(7)
  metrics = []
  for _ in range(STEPS):
    b = batch_lib.synthetic_batch(rng, B, config.data.seq_len, config.model.vocab_size,
                                  num_domains=2, docs_per_row=2)
    b["roles"] = np.asarray(roles, np.int32)
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    idx = step_lib.distill_index(b["roles"], 1, with_replay=config.objective.replay_kd > 0,
                                 with_distill=False)
    if idx is not None:
      batch["distill_index"] = jnp.asarray(idx)
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return layout, jax.device_get(state.params), metrics


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                          jax.tree.leaves(b)))


def test_the_old_signals_scale_does_not_reach_Ts_steps():
  """Adam is invariant to a gradient's scale: with separate moments, the old signal x100
  (replay CE and KD weights) leaves the run where it was; with one shared AdamW it moves
  T's steps (the old gradient fills the shared second moment)."""
  base = {"objective.replay_kd": 4.0, "objective.lambda_replay": 0.5}
  big = {"objective.replay_kd": 400.0, "objective.lambda_replay": 50.0}
  layout, sep, m = _trajectory(_config(**base))
  assert isinstance(layout, split_moments.SplitMoments)
  _, sep_big, _ = _trajectory(_config(**big))
  _, shared, _ = _trajectory(_config("shared", **base))
  _, shared_big, _ = _trajectory(_config("shared", **big))
  # Float rounding reaches only the coordinates whose gradients are near zero (their
  # m / sqrt(v) is a ratio of tiny numbers): 2e-4 at most, against steps of lr = 3e-3.
  assert _max_diff(sep, sep_big) < 1e-3
  assert _max_diff(shared, shared_big) > 0.01 and \
      _max_diff(shared, shared_big) > 20 * _max_diff(sep, sep_big)
  assert all(float(x["grad_norm_old"]) > 0 and float(x["update_norm_old"]) > 0 for x in m)
  assert all(int(x["pullback_rows"]) == B for x in m)


def test_without_old_rows_it_is_the_plain_step():
  """No old signal: AdamW_old sees exact zeros and moves nothing; the run is the shared
  AdamW's (to float rounding: a vjp and value_and_grad compile differently)."""
  kw = {"objective.replay_kd": 4.0}
  _, sep, m = _trajectory(_config(**kw), roles=[batch_lib.NEW] * B)
  layout, shared, _ = _trajectory(_config("shared", **kw), roles=[batch_lib.NEW] * B)
  assert type(layout) is layout_lib.Plain
  assert _max_diff(sep, shared) < 1e-6
  assert all(float(x["update_norm_old"]) == 0.0 and int(x["pullback_rows"]) == 0 for x in m)


def test_old_lr_scale_zero_leaves_T_alone():
  """old_lr_scale 0: the replay rows' KD changes nothing (T's gradient is the new rows'
  CE only); at scale 1 it moves the run."""
  on = {"objective.replay_kd": 4.0, "optimizer.old_lr_scale": 0.0}
  off = {"objective.replay_kd": 0.0, "optimizer.old_lr_scale": 0.0}
  _, a, _ = _trajectory(_config(**on))
  _, b, _ = _trajectory(_config(**off))
  assert _max_diff(a, b) < 1e-7
  _, c, _ = _trajectory(_config(**{**on, "optimizer.old_lr_scale": 1.0}))
  assert _max_diff(a, c) > 1e-4


def test_old_optimizer_config_scales_lr_and_drops_weight_decay():
  c = _config(**{"optimizer.old_lr_scale": 0.25})
  old = split_moments.old_optimizer_config(c.optimizer)
  assert old.lr == pytest.approx(0.25 * c.optimizer.lr) and old.weight_decay == 0.0
  assert c.optimizer.weight_decay > 0  # the original is left alone


def test_config_errors_name_the_key():
  c = _config("apart")
  with pytest.raises(ValueError, match="optimizer.old_moments='apart'"):
    config_lib.validate_config(c, 1, 1)
  c = _config(**{"objective.projection": "old"})
  with pytest.raises(ValueError, match="old_moments='separate' needs the plain layout"):
    config_lib.validate_config(c, 1, 1)
  c = _config(**{"optimizer.old_lr_scale": -1.0})
  with pytest.raises(ValueError, match="optimizer.old_lr_scale=-1.0"):
    config_lib.validate_config(c, 1, 1)


def test_a_stage_trains_checkpoints_and_resumes_with_both_moments(tmp_path):
  """Through the loop: twice the plain optimizer state, second pull-backs counted, and a
  crash and resume (both AdamW states restored) end where one run does."""
  corpus = write_corpus(tmp_path / "corpus")
  config = one_device_config(corpus, **{"optimizer.old_moments": "separate"})
  whole = train_one_device(config, tmp_path / "a")
  plain = train_one_device(one_device_config(corpus), tmp_path / "p")
  opt = whole["state_bytes"]["opt_state"]["model"]
  assert opt == 2 * plain["state_bytes"]["opt_state"]["model"]
  assert whole["pullback_rows"] > 0
  resumed = crash_then_resume(config, tmp_path / "b", step=4)
  assert resumed["pullback_rows"] == whole["pullback_rows"]
  assert resumed["eval"] == whole["eval"]
