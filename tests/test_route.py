"""The routed sigma / tau step's single backward pass against two pull-backs of the merged model.

Reference (the definition of routing): with W = sigma + (alpha / r) A B merged into the
weights, grad_tau = d loss_new / d tau and grad_sigma = d loss_old / d sigma, each from
its own `jax.vjp` of the objective. The layout's `grads` takes one backward of the whole
loss with tau's A and B beside sigma's kernels and each row's cotangents routed in the
model; every leaf of both groups (kernels, adapters, norms, embeddings, biases) must match.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax.train import context as context_lib
from cpt_jax.train import decomposition
from cpt_jax.train import objective, step as step_lib
from cpt_jax.train import tau as tau_lib
from tests.helpers import tiny_config

NEW, REPLAY, DISTILL, EVAL = batch_lib.NEW, batch_lib.REPLAY, batch_lib.DISTILL, batch_lib.EVAL


def _config(**kw):
  c = tiny_config()
  c.sharding.mesh_shape = (1, 1, 1)
  c.decomposition.update(mode="lora", routing=True, lora_rank=4, lora_alpha=8.0,
                         targets=r"(attn/(q|v|o)|mlp/(gate|down))/kernel")
  for key, value in kw.items():
    group, name = key.split(".")
    c[group][name] = value
  return c


def _perturbed(ctx, seed=1):
  """sigma and tau away from init (B != 0, norms != 1), so every path carries gradient."""
  model = nn.unbox(ctx.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params = ctx.layout.init(model, jax.random.PRNGKey(2))
  leaves, tdef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [x + rng.normal(0, 0.05, x.shape).astype(np.float32) for x in leaves]
  return jax.tree.unflatten(tdef, leaves)


def _batch(config, roles):
  b = batch_lib.synthetic_batch(np.random.default_rng(0), len(roles), config.data.seq_len,
                                config.model.vocab_size, num_domains=3, roles=roles)
  b = {k: jnp.asarray(v) for k, v in b.items()}
  if config.objective.lambda_kd > 0:
    b["distill_index"] = jnp.asarray(step_lib.distill_index(np.asarray(b["roles"]), 1)[0])
  return b


def _two_pullbacks(loss_fn, layout, params, batch, frozen):
  """grad_tau of loss_new and grad_sigma of loss_old on the merged weights."""
  def pair(p):
    loss, aux = loss_fn(p, batch, frozen)
    return jnp.stack([aux["loss_new"], loss - aux["loss_new"]])

  assert layout.merge(params).keys() == params["sigma"].keys()  # the merged model tree
  _, vjp = jax.vjp(pair, params)
  (g_new,) = vjp(jnp.asarray([1.0, 0.0]))
  (g_old,) = vjp(jnp.asarray([0.0, 1.0]))
  return {"sigma": g_old["sigma"], "tau": g_new["tau"]}


CASES = {
    "replay_distill_l2sp_zloss": ({"objective.lambda_kd": 1.0, "objective.l2sp": 0.3,
                                   "train.z_loss": 1e-3,
                                   "train.init_checkpoint": "unused"},  # KD needs a teacher
                                  (NEW, DISTILL, REPLAY, NEW, EVAL, NEW)),
    "tied_bias_scan_lm_head": ({"model.tie_embeddings": True, "model.qkv_bias": True,
                                "model.scan_layers": True,
                                "decomposition.targets": r"attn/(q|k)/kernel"},
                               (REPLAY, NEW, NEW, REPLAY)),
    "lm_head_remat": ({"model.remat": "full",
                       "decomposition.targets": r"(lm_head|mlp/up)/kernel"},
                      (NEW, REPLAY, REPLAY, NEW)),
    # Subtree deltas on Dense kernels: x (W + delta), d delta from the new rows.
    "subtree_distill_lm_head": ({"decomposition.mode": "subtree", "objective.lambda_kd": 1.0,
                                 "train.init_checkpoint": "unused",
                                 "decomposition.targets": r"(attn/(q|o)|mlp/down|lm_head)/kernel"},
                                (NEW, DISTILL, REPLAY, NEW)),
    "subtree_scan_remat_bias": ({"decomposition.mode": "subtree", "model.scan_layers": True,
                                 "model.remat": "full", "model.qkv_bias": True,
                                 "decomposition.targets": r"(attn/k|mlp/gate)/kernel"},
                                (REPLAY, NEW, NEW, REPLAY)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_backward_equals_two_pullbacks(case):
  overrides, roles = CASES[case]
  config = _config(**overrides)
  ctx = context_lib.build_context(config, jax.devices()[:1])
  assert ctx.layout.tau.on_kernels_only
  loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, num_domains=3,
                                   z_loss=config.train.z_loss, layout=ctx.layout)
  params = _perturbed(ctx)
  teacher = jax.tree.map(lambda x: x * 0.97, ctx.layout.merge(params))
  frozen = {"teacher": teacher}
  batch = _batch(config, roles)

  got, aux = jax.jit(lambda p: ctx.layout.grads(loss_fn, p, batch, frozen))(params)
  want = jax.jit(lambda p: _two_pullbacks(loss_fn, ctx.layout, p, batch, frozen))(params)
  if config.objective.lambda_kd > 0:
    assert float(aux["kd_term"]) > 0
  flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  assert len(flat_got) == len(flat_want)
  frozen_base = ctx.layout.tau.frozen_base()  # subtree: sigma's leaves under a delta
  for path, g in flat_got:
    w = flat_want[path]
    name = jax.tree_util.keystr(path)
    keys = tau_lib.path_keys(path)
    if keys[0] == "sigma" and keys[1:] in frozen_base:
      assert not np.any(np.asarray(g)), name  # frozen under its delta: no gradient computed
      continue
    assert np.abs(w).max() > 0, name  # every leaf carries a gradient in this batch
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * float(np.abs(w).max()),
                               err_msg=name)


def test_freeze_sigma_routed_tau_gradient_equals_its_pullback():
  config = _config(**{"decomposition.freeze_sigma": True})
  ctx = context_lib.build_context(config, jax.devices()[:1])
  loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, num_domains=3,
                                   layout=ctx.layout)
  params = _perturbed(ctx)
  batch = _batch(config, (NEW, REPLAY, NEW, REPLAY))
  got, _ = jax.jit(lambda p: ctx.layout.grads(loss_fn, p, batch, {}))(params)
  want = jax.jit(lambda p: _two_pullbacks(loss_fn, ctx.layout, p, batch, {}))(params)
  assert set(got) == {"tau"}
  for g, w in zip(jax.tree.leaves(got["tau"]), jax.tree.leaves(want["tau"])):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * float(np.abs(w).max()))


def test_routed_forward_equals_merged_forward_and_subtree_is_merged():
  config = _config()
  ctx = context_lib.build_context(config, jax.devices()[:1])
  params = _perturbed(ctx)
  b = _batch(config, (NEW, REPLAY))
  rows = jnp.asarray([1.0, 0.0])
  side = ctx.layout.merge({**params, decomposition.ROWS: rows})
  assert "lora_a" in side["layers_0"]["attn"]["q"] and "lora_a" not in side["layers_0"]["attn"]["k"]
  run = lambda p: ctx.apply_fn(p, b["inputs"], b["segment_ids"], b["positions"])
  np.testing.assert_allclose(run(side), run(ctx.layout.merge(params)), rtol=1e-4, atol=1e-4)

  # Subtree deltas on kernels are side branches too; a delta on a norm scale is merged.
  sub = context_lib.build_context(_config(**{"decomposition.mode": "subtree"}),
                                  jax.devices()[:1])
  both = _perturbed(sub)
  side = sub.layout.merge({**both, decomposition.ROWS: rows})
  assert "delta" in side["layers_0"]["attn"]["q"] and "delta" not in side["layers_0"]["attn"]["k"]
  np.testing.assert_allclose(run(side), run(sub.layout.merge(both)), rtol=1e-4, atol=1e-4)
  norm = context_lib.build_context(_config(**{
      "decomposition.mode": "subtree", "decomposition.targets": r"attn/q/kernel|attn_norm"}),
      jax.devices()[:1])
  assert not norm.layout.tau.on_kernels_only
  with pytest.raises(ValueError, match="other than Dense kernels"):
    norm.layout.tau.with_adapters(_perturbed(norm), rows)
