"""Gradient projection between T's signal and the old one (objective.projection)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax import config as config_lib
from cpt_jax.train import context as context_lib
from cpt_jax.train import objective, projection, state as state_lib, step as step_lib
from tests.helpers import crash_then_resume, one_device_config, tiny_config
from tests.helpers import train_one_device, write_corpus

B = 8


def _tree(rng, scale=1.0):
  return {"a": jnp.asarray(scale * rng.normal(size=(3, 4)), jnp.float32),
          "b": {"c": jnp.asarray(scale * rng.normal(size=(5,)), jnp.float32)}}


def _dot(a, b):
  return float(sum(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _conflicting(rng):
  g_new = _tree(rng)
  noise = _tree(rng, 0.3)
  g_old = jax.tree.map(lambda n, z: -0.8 * n + z, g_new, noise)
  assert _dot(g_new, g_old) < 0
  return g_new, g_old


def test_old_mode_keeps_the_first_order_gain_on_T():
  """'old': the summed step lowers loss_new at least as much as T's own gradient does,
  and the old signal still lowers loss_old more than T's gradient alone would."""
  g_new, g_old = _conflicting(np.random.default_rng(0))
  plain = jax.tree.map(jnp.add, g_new, g_old)
  g, m = projection.project(g_new, g_old, "old")
  assert _dot(plain, g_new) < _dot(g_new, g_new)  # without it, T's gain is cut
  assert _dot(g, g_new) == pytest.approx(_dot(g_new, g_new), rel=1e-5)
  assert _dot(g, g_old) > _dot(g_new, g_old)
  assert float(m["grad_conflict"]) == 1.0 and float(m["grad_cosine"]) < -0.5


def test_new_mode_is_agem():
  """'new' (A-GEM): the step lowers loss_old at least as much as the old gradient alone."""
  g_new, g_old = _conflicting(np.random.default_rng(1))
  g, _ = projection.project(g_new, g_old, "new")
  assert _dot(g, g_old) == pytest.approx(_dot(g_old, g_old), rel=1e-5)
  assert _dot(g, g_new) > _dot(g_old, g_new)


def test_both_mode_lowers_both_losses():
  g_new, g_old = _conflicting(np.random.default_rng(2))
  g, _ = projection.project(g_new, g_old, "both")
  assert _dot(g, g_new) > 0 and _dot(g, g_old) > 0


@pytest.mark.parametrize("mode", ["old", "new", "both"])
def test_no_conflict_leaves_the_gradient_alone(mode):
  rng = np.random.default_rng(3)
  g_new = _tree(rng)
  g_old = jax.tree.map(lambda x, z: 0.5 * x + z, g_new, _tree(rng, 0.1))
  g, m = projection.project(g_new, g_old, mode)
  want = jax.tree.map(jnp.add, g_new, g_old)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), g, want)
  assert float(m["grad_conflict"]) == 0.0
  g0, m0 = projection.project(g_new, jax.tree.map(jnp.zeros_like, g_new), mode)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), g0, g_new)
  assert float(m0["grad_cosine"]) == 0.0


def _config(mode, **objective_kw):
  c = tiny_config()
  c.train.global_batch_size = B
  c.objective.update(projection=mode, **objective_kw)
  c.sharding.mesh_shape = (1, 1, 1)
  c.train.init_checkpoint = "teacher"  # only satisfies validation: the test builds it
  return c


def _batch(config, roles):
  b = batch_lib.synthetic_batch(np.random.default_rng(5), B, config.data.seq_len,
                                config.model.vocab_size, num_domains=2, docs_per_row=2)
  b["roles"] = np.asarray(roles, np.int32)
  return b


def _step(config, roles, grad_accum=1):
  """(update, metrics, g_new, g_old) of one SGD(1) step; g_* from jax.grad of each signal.

  The teacher sits a step up T's gradient from the params, so that the replay rows'
  KL pulls against T's signal (the two gradients conflict)."""
  config = config.copy_and_resolve_references()
  config.train.grad_accum_steps = grad_accum
  ctx = context_lib.build_context(config, jax.devices()[:1])
  assert isinstance(ctx.layout, projection.Projected)
  layout = projection.Projected(optax.sgd(1.0), lambda s: 1.0, config.objective.projection,
                                config.objective)
  params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, config.seed,
                                config.data.seq_len).params
  loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, 2, layout=layout)
  b = _batch(config, roles)
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  idx = step_lib.distill_index(b["roles"], grad_accum, with_replay=True, with_distill=False)
  one = dict(batch)  # the A = 1 batch of the reference gradients
  if idx is not None:
    batch["distill_index"] = jnp.asarray(idx)
    one["distill_index"] = jnp.asarray(step_lib.distill_index(
        b["roles"], 1, with_replay=True, with_distill=False)[0])
  norms = dict(objective.normalisers(one), param_share=jnp.asarray(1.0))

  def signal(p, which, frozen):
    loss, aux = loss_fn(p, one, frozen, norms=norms)
    return aux["loss_new"] if which == "new" else loss - aux["loss_new"]

  g_t = jax.grad(signal)(params, "new", {"teacher": params})
  frozen = {"teacher": jax.tree.map(lambda p, g: p + 100.0 * g, params, g_t)}
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=layout.tx.init(params), frozen=frozen)
  new_state, m = jax.jit(step_lib.make_train_step(loss_fn, layout, grad_accum))(state, batch)
  update = jax.tree.map(lambda a, c: a - c, params, new_state.params)
  g_new = jax.grad(signal)(params, "new", frozen)
  g_old = jax.grad(signal)(params, "old", frozen)
  return jax.device_get(update), jax.device_get(m), g_new, g_old


_MIXED = [batch_lib.NEW] * 6 + [batch_lib.REPLAY] * 2


@pytest.mark.parametrize("mode", ["old", "new"])
def test_layout_projects_the_two_signals_of_the_step(mode):
  """The step's update is the projection of d loss_new and d loss_old, each taken on its
  own; under gradient accumulation it projects the whole batch's sums."""
  config = _config(mode, replay_kd=4.0, lambda_replay=0.5)
  update, m, g_new, g_old = _step(config, _MIXED)
  want, _ = projection.project(g_new, g_old, mode)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               update, want)
  cos = _dot(g_new, g_old) / np.sqrt(_dot(g_new, g_new) * _dot(g_old, g_old))
  assert cos < -0.2 and float(m["grad_conflict"]) == 1.0
  assert float(m["grad_cosine"]) == pytest.approx(cos, abs=1e-4)
  update2, m2, _, _ = _step(config, _MIXED, grad_accum=2)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               update2, update)
  assert float(m2["grad_cosine"]) == pytest.approx(float(m["grad_cosine"]), abs=1e-4)
  assert int(m["pullback_rows"]) == int(m2["pullback_rows"]) == B


def test_layout_without_old_rows_is_the_plain_step():
  config = _config("both", replay_kd=4.0)
  update, m, g_new, _ = _step(config, [batch_lib.NEW] * B)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               update, jax.device_get(g_new))
  assert float(m["grad_cosine"]) == 0.0 and float(m["grad_conflict"]) == 0.0
  assert int(m["pullback_rows"]) == 0


def test_config_errors_name_the_key():
  c = _config("sideways")
  with pytest.raises(ValueError, match="objective.projection='sideways'"):
    config_lib.validate_config(c, 1, 1)
  c = _config("old")
  c.decomposition.mode = "lora"
  with pytest.raises(ValueError, match="objective.projection needs the plain layout"):
    config_lib.validate_config(c, 1, 1)


def test_second_pullbacks_are_counted_in_the_budget_and_survive_a_resume(tmp_path):
  """The loop counts the rows of every second pull-back (their backward FLOPs go to the
  budget's 'second_pullback' part); a crash and resume count the same as one run."""
  corpus = write_corpus(tmp_path / "corpus")
  config = one_device_config(corpus, **{"objective.projection": "old"})
  config.replay.max_tflops = 1e6  # active: the summary carries the budget's parts
  whole = train_one_device(config, tmp_path / "a")
  rows = whole["pullback_rows"]
  # Each step with a replay row (most of the 3-domain mix's steps) takes one: all B rows.
  assert rows % config.train.global_batch_size == 0
  assert config.train.global_batch_size <= rows <= config.train.steps * \
      config.train.global_batch_size
  assert whole["budget"]["tflops_by_part"]["second_pullback"] == pytest.approx(
      whole["pullback_tflops"])
  fwd_bwd = whole["train_tflops"] / (config.train.steps * config.train.global_batch_size)
  assert 0.5 * fwd_bwd < whole["pullback_tflops"] / rows < fwd_bwd  # a backward, not a step
  resumed = crash_then_resume(config, tmp_path / "b", step=4)
  assert resumed["pullback_rows"] == rows
