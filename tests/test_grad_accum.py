"""Gradient accumulation computes the objective of the whole batch, not a mean of means.

For a global batch split into A microbatches, loss and gradients must equal the
A = 1 step's: every normaliser (CE tokens, distill tokens) is the global batch's,
and parameter-only terms (L2-SP, EWC) count once.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax.train import context as context_lib
from cpt_jax.train import decomposition as decomp_lib
from cpt_jax.train import layout as layout_lib
from cpt_jax.train import objective, state as state_lib, step as step_lib, trainer
from tests.helpers import tiny_config

B = 16  # rows; distill rows at 0 and 8 fall in microbatch 0 for A = 2 and A = 4.
_ROLES = np.array([batch_lib.DISTILL, batch_lib.NEW, batch_lib.REPLAY, batch_lib.NEW] * 4)
_ROLES[8 % len(_ROLES)] = batch_lib.DISTILL
_ROLES[4] = batch_lib.NEW
_ROLES[12] = batch_lib.REPLAY


def _config(**objective_kw):
  c = tiny_config()
  c.train.global_batch_size = B
  c.train.z_loss = 1e-3
  c.objective.update(lambda_replay=0.5, lambda_kd=1.5, replay_kd=0.7, kd_temperature=2.0,
                     ewc=0.3, **objective_kw)
  c.sharding.mesh_shape = (1, 1, 1)
  c.train.init_checkpoint = "teacher"  # only satisfies validation: the test builds the teacher
  return c


def _batch(config):
  rng = np.random.default_rng(3)
  b = batch_lib.synthetic_batch(rng, B, config.data.seq_len, config.model.vocab_size,
                                num_domains=3, docs_per_row=3)
  b["roles"] = _ROLES.astype(np.int32)
  # Uneven padding: every row keeps a different number of loss tokens.
  for i in range(B):
    b["loss_weights"][i, config.data.seq_len - 1 - 2 * i:] = 0.0
  return b


def _frozen(params):
  key = jax.random.key(7)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, 2 * len(leaves))
  teacher = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys[::2])]
  fisher = [jnp.abs(jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys[1::2])]
  return {"teacher": tree.unflatten(teacher), "fisher": tree.unflatten(fisher)}


def _grads_and_loss(config, grad_accum, decomp_mode=""):
  """(grads, metrics) of one step with SGD(1): grads = params_before - params_after."""
  config = config.copy_and_resolve_references()
  config.train.grad_accum_steps = grad_accum
  config.decomposition.mode = decomp_mode
  ctx = context_lib.build_context(config, jax.devices()[:1])
  params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, config.seed,
                                config.data.seq_len).params
  layout = copy.copy(ctx.layout)  # SGD(1) per trainable group: grads = params before - after
  if isinstance(layout, decomp_lib.SigmaTau):
    layout.txs = {g: optax.sgd(1.0) for g in layout.trainable_groups}
    layout.tx = decomp_lib.GroupOptimizer(layout.txs)
  else:
    layout = layout_lib.Plain(optax.sgd(1.0), lambda s: 1.0)
  tx = layout.tx
  frozen = _frozen(ctx.model_params(params))
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), frozen=frozen)
  loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, 3, config.train.z_loss,
                                   layout=layout, features_fn=ctx.features_fn)
  step = step_lib.make_train_step(loss_fn, layout, grad_accum)
  b = _batch(config)
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  idx = step_lib.distill_index(b["roles"], grad_accum, with_replay=True)
  batch["distill_index"] = jnp.asarray(idx)
  new_state, m = jax.jit(step)(state, batch)
  grads = jax.tree.map(lambda a, c: a - c, params, new_state.params)
  return jax.device_get(grads), jax.device_get(m)


@pytest.mark.parametrize("topk,focus,features", [(0, 0.0, 0.0), (5, 0.0, 0.0), (0, 3.0, 0.0),
                                                  (0, 0.0, 2.0)])
def test_accumulated_loss_and_grads_equal_the_full_batch(topk, focus, features):
  config = _config(kd_topk=topk, replay_kd_focus=focus, replay_features=features,
                   replay_features_margin=0.001 if features else 0.0)
  g1, m1 = _grads_and_loss(config, 1)
  keys = ("loss", "ce_term", "z_term", "kd_term", "replay_kd_term", "ewc_term") + \
      (("replay_features_term",) if features else ())
  if features:
    assert m1["replay_features_term"] > 0
  for a in (2, 4):
    ga, ma = _grads_and_loss(config, a)
    for key in keys:
      np.testing.assert_allclose(ma[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=f"A={a} {key}")
    np.testing.assert_allclose(ma["kd_tokens"], m1["kd_tokens"])
    np.testing.assert_allclose(ma["role_tokens"], m1["role_tokens"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4), ga, g1)


def test_accumulated_routed_grads_equal_the_full_batch():
  """sigma / tau routing: both signals' gradients are the full batch's."""
  config = _config()
  g1, m1 = _grads_and_loss(config, 1, decomp_mode="lora")
  g4, m4 = _grads_and_loss(config, 4, decomp_mode="lora")
  for key in ("loss", "loss_new", "loss_old"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4), g4, g1)


def test_full_batch_loss_by_hand():
  """The A = 1 objective against a hand computation from the model's logits."""
  config = _config(kd_topk=0)
  config.train.z_loss = 0.0
  ctx = context_lib.build_context(config, jax.devices()[:1])
  params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, config.seed,
                                config.data.seq_len).params
  frozen = _frozen(params)
  b = _batch(config)
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  batch["distill_index"] = jnp.asarray(step_lib.distill_index(b["roles"], 1,
                                                              with_replay=True)[0])
  loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, 3)
  loss, aux = loss_fn(params, batch, frozen)

  apply = functools.partial(ctx.apply_fn, inputs=batch["inputs"],
                            segment_ids=batch["segment_ids"], positions=batch["positions"])
  s = np.asarray(jax.nn.log_softmax(apply(params), -1), np.float64)
  t_logits = np.asarray(apply(frozen["teacher"]), np.float64)
  w = b["loss_weights"].astype(np.float64)
  ce = -np.take_along_axis(s, b["targets"][..., None], -1)[..., 0]
  new, rep, dis = (b["roles"] == batch_lib.NEW, b["roles"] == batch_lib.REPLAY,
                   b["roles"] == batch_lib.DISTILL)
  ce_tokens = w[new].sum() + w[rep].sum()  # one token mean over all CE tokens
  want_ce = ((ce * w)[new].sum() + 0.5 * (ce * w)[rep].sum()) / ce_tokens
  tau = 2.0
  st = np.asarray(jax.nn.log_softmax(apply(params) / tau, -1), np.float64)
  tt = t_logits / tau
  tt = tt - np.log(np.exp(tt - tt.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - tt.max(-1, keepdims=True)
  kl = (np.exp(tt) * (tt - st)).sum(-1)
  want_kd = (kl * w)[dis].sum() / w[dis].sum()
  want_rkd = (kl * w)[rep].sum() / ce_tokens
  fisher_term = 0.5 * sum(float(np.sum(f * (p - q) ** 2)) for f, p, q in zip(
      jax.tree.leaves(frozen["fisher"]), jax.tree.leaves(params),
      jax.tree.leaves(frozen["teacher"])))
  want = want_ce + tau ** 2 * (1.5 * want_kd + 0.7 * want_rkd) + 0.3 * fisher_term
  assert float(aux["ce_term"]) == pytest.approx(want_ce, rel=1e-5)
  assert float(aux["kd_term"]) == pytest.approx(want_kd, rel=1e-4)
  assert float(aux["replay_kd_term"]) == pytest.approx(want_rkd, rel=1e-4)
  assert float(loss) == pytest.approx(want, rel=1e-5)
