"""Lookahead (optimizer.lookahead_every / lookahead_alpha, train/optimizer.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import config as config_lib
from cpt_jax.train import optimizer as optimizer_lib
from tests.helpers import crash_then_resume, one_device_config, train_one_device
from tests.helpers import tiny_config, write_corpus


def _run(tx, grad_fn, x0, steps):
  """The params after each of `steps` updates of tx from x0 ({'w': [n]})."""
  params, state, out = x0, tx.init(x0), []
  for _ in range(steps):
    updates, state = tx.update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out


def _noisy_quadratic_grad(params):
  w = params["w"]
  return {"w": w * jnp.asarray([1.0, 3.0, 0.5]) + jnp.sin(7.0 * w)}


X0 = {"w": jnp.asarray([1.0, -2.0, 0.5])}


def test_alpha_one_is_the_inner_optimizer():
  inner = optax.adamw(0.05)
  plain = _run(inner, _noisy_quadratic_grad, X0, 7)
  wrapped = _run(optax.chain(optax.adamw(0.05), optimizer_lib.lookahead(3, 1.0)),
                 _noisy_quadratic_grad, X0, 7)
  for a, b in zip(plain, wrapped):
    np.testing.assert_allclose(a["w"], b["w"], atol=1e-6)


def test_each_period_ends_alpha_of_the_way_from_its_start_to_plain_sgds_end():
  """Period by period against plain SGD restarted from each period's start: steps 1..k-1
  are SGD's own, step k lands alpha of the way from the start to SGD's k-th point."""
  k, alpha, lr = 3, 0.4, 0.1
  got = _run(optax.chain(optax.sgd(lr), optimizer_lib.lookahead(k, alpha)),
             _noisy_quadratic_grad, X0, 2 * k)
  start = X0
  for period in range(2):
    sgd = _run(optax.sgd(lr), _noisy_quadratic_grad, start, k)
    for j in range(k - 1):
      np.testing.assert_allclose(got[period * k + j]["w"], sgd[j]["w"], atol=1e-6)
    end = got[period * k + k - 1]["w"]
    np.testing.assert_allclose(end, start["w"] + alpha * (sgd[-1]["w"] - start["w"]),
                               atol=1e-6)
    assert not np.allclose(end, sgd[-1]["w"], atol=1e-3)
    start = {"w": end}


def test_on_a_constant_gradient_it_moves_alpha_times_as_far():
  """Whole periods of SGD on a linear loss: the slow weights move alpha * steps * lr * g."""
  g = {"w": jnp.asarray([1.0, -2.0, 0.5])}
  out = _run(optax.chain(optax.sgd(0.1), optimizer_lib.lookahead(4, 0.25)), lambda _: g,
             X0, 12)
  np.testing.assert_allclose(out[-1]["w"], X0["w"] - 0.25 * 12 * 0.1 * g["w"], atol=1e-6)


def test_the_slow_weights_are_a_params_tree_for_sharding():
  """optax.tree_utils.tree_map_params (the layout's opt_shardings) finds the slow copy."""
  tx = optax.chain(optax.adamw(0.1), optimizer_lib.lookahead(2, 0.5))
  state = tx.init(X0)
  mapped = optax.tree_utils.tree_map_params(tx, lambda _: "P", state,
                                            transform_non_params=lambda _: "R")
  assert mapped[-1].slow == {"w": "P"} and mapped[-1].count == "R"


def test_config_errors_name_the_key():
  def check(match, **kw):
    with pytest.raises(ValueError, match=match):
      config_lib.validate_config(tiny_config(**kw), 1, 1)
  check(r"optimizer.lookahead_every=-1", **{"optimizer.lookahead_every": -1})
  check(r"optimizer.lookahead_alpha=0.0", **{"optimizer.lookahead_every": 5,
                                             "optimizer.lookahead_alpha": 0.0})
  check(r"lookahead_every needs optimizer.old_moments='shared'",
        **{"optimizer.lookahead_every": 5, "optimizer.old_moments": "separate"})
  check(r"decomposition.skip_idle_updates=False",
        **{"optimizer.lookahead_every": 5, "decomposition.mode": "lora"})


def test_a_stage_trains_checkpoints_and_resumes_with_lookahead(tmp_path):
  """Through the loop: one more params copy of optimizer state, a different run from the
  plain one, and a crash between two syncs resumed to the same evals."""
  corpus = write_corpus(tmp_path / "corpus")
  over = {"optimizer.lookahead_every": 3, "optimizer.lookahead_alpha": 0.5}
  config = one_device_config(corpus, **over)
  whole = train_one_device(config, tmp_path / "a")
  plain = train_one_device(one_device_config(corpus), tmp_path / "p")
  sb, pb = whole["state_bytes"], plain["state_bytes"]
  assert sb["opt_state"]["model"] == (pb["opt_state"]["model"] + pb["params"]["model"]
                                      + 4)  # + the int32 step count
  assert whole["eval"] != plain["eval"]
  resumed = crash_then_resume(config, tmp_path / "b", step=4)
  assert resumed["eval"] == whole["eval"]
