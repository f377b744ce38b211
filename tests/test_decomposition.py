"""sigma / tau decomposition: LoRA merge, gradient routing, per-group optimizers, resume."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import stages
from cpt_jax import batch as batch_lib
from cpt_jax import config as config_lib
from cpt_jax import export as export_lib
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import context as context_lib
from cpt_jax.train import tau as tau_lib
from cpt_jax.train import metrics as metrics_lib
from cpt_jax.train import objective, state as state_lib, step as step_lib
from tests.helpers import tiny_config, write_corpus
import suite_lib  # benchmarks/ (conftest)

NEW, REPLAY, DISTILL = batch_lib.NEW, batch_lib.REPLAY, batch_lib.DISTILL


ROUTING = {"decomposition.skip_idle_updates": False, "optimizer.weight_decay": 0.0}


def _config(mode="lora", **kw):
  c = tiny_config()
  c.sharding.mesh_shape = (1, 1, 1)
  c.optimizer.update(schedule="constant", warmup_steps=0, lr=1e-2)
  c.decomposition.mode = mode
  for key, value in kw.items():
    group, name = key.split(".")
    c[group][name] = value
  return c


_SETUPS = {}


def _setup(config, devices=None):
  """(ctx, step, fresh state); ctx and the step are cached per config (compiles are slow)."""
  key = (config.to_json_best_effort(), len(devices or ()))
  if key not in _SETUPS:
    ctx = context_lib.build_context(config, devices or jax.devices()[:1])
    loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, num_domains=3,
                                     layout=ctx.layout)
    step = step_lib.make_train_step(loss_fn, ctx.layout, config.train.grad_accum_steps)
    step.jitted = {}
    _SETUPS[key] = (ctx, step)
  ctx, step = _SETUPS[key]
  state = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, config.seed,
                               config.data.seq_len)
  return ctx, step, state


def _batch(config, roles, seed=0):
  return batch_lib.synthetic_batch(np.random.default_rng(seed), config.train.global_batch_size,
                                   config.data.seq_len, config.model.vocab_size, num_domains=3,
                                   roles=roles)


def _run(ctx, step, state, b):
  keys = tuple(sorted(b))
  if keys not in step.jitted:
    step.jitted[keys] = step_lib.jit_train_step(step, ctx.state_sh, ctx.mesh, ctx.rules, keys)
  fn = step.jitted[keys]
  dev = shd.global_batch({k: v for k, v in b.items() if k != "distill_index"}, ctx.mesh)
  if "distill_index" in b:
    dev["distill_index"] = jax.device_put(b["distill_index"], shd.replicated(ctx.mesh))
  return fn(jax.tree.map(jnp.copy, state), dev)  # the step donates its input


def _equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a)),
                                                   jax.tree.leaves(jax.device_get(b))))


def _logits(ctx, params, b):
  """The model's logits; trained (sigma / tau) params are merged as the loss merges them."""
  if isinstance(params, dict) and set(params) == {"sigma", "tau"}:
    params = ctx.model_params(params)
  return np.asarray(ctx.apply_fn(params, jnp.asarray(b["inputs"]), jnp.asarray(b["segment_ids"]),
                                 jnp.asarray(b["positions"])))


def _random_tau(state, seed=1):
  """tau with B != 0 (as after training)."""
  leaves, tdef = jax.tree.flatten(jax.device_get(state.params["tau"]))
  rng = np.random.default_rng(seed)
  leaves = [rng.normal(0, 0.2, x.shape).astype(np.float32) for x in leaves]
  return {"sigma": state.params["sigma"], "tau": jax.tree.unflatten(tdef, leaves)}


# ------------------------------------------------------------------ LoRA algebra


def test_lora_zero_b_leaves_outputs_unchanged():
  config = _config()
  ctx, _, state = _setup(config)
  b = _batch(config, (NEW,))
  tau = jax.device_get(state.params["tau"])
  assert all(np.all(t["kernel"]["lora_b"] == 0) for layer in tau.values()
             for t in layer["attn"].values())
  assert any(np.any(t["kernel"]["lora_a"] != 0) for layer in tau.values()
             for t in layer["attn"].values())
  np.testing.assert_array_equal(_logits(ctx, state.params, b),
                                _logits(ctx, state.params["sigma"], b))


def test_merged_weights_reproduce_adapter_logits():
  """The merged model vs an unmerged adapter forward: y = x W + (alpha/r) (x A) B at each Dense."""
  config = _config(**{"decomposition.targets": r"(attn/(q|o)|mlp/down)/kernel",
                      "decomposition.lora_rank": 4, "decomposition.lora_alpha": 8.0})
  ctx, _, state = _setup(config)
  params = _random_tau(state)
  b = _batch(config, (NEW,))
  tau, scale = params["tau"], ctx.layout.tau.scale
  seen = []

  def adapter(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name != "__call__" or not hasattr(mod, "in_shape"):
      return out
    node = tau
    for k in mod.scope.path:
      node = node.get(k) if isinstance(node, dict) else None
      if node is None:
        return out
    seen.append(mod.scope.path)
    x = args[0]
    xa = jnp.tensordot(x, node["kernel"]["lora_a"], axes=len(mod.in_shape))
    return out + scale * jnp.tensordot(xa, node["kernel"]["lora_b"], axes=1)

  with nn.intercept_methods(adapter):
    ref = _logits(ctx, params["sigma"], b)
  assert len(seen) == 6, seen  # q, o, down in both layers
  merged = ctx.layout.merge(params)
  assert set(merged) == set(params["sigma"])  # a plain model tree (save_hf takes it)
  got = _logits(ctx, merged, b)
  assert np.abs(got - _logits(ctx, params["sigma"], b)).max() > 1e-2  # tau matters
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(got, _logits(ctx, params, b))  # what training sees


def test_lora_merge_of_stacked_layers_matches_per_layer():
  a = np.random.default_rng(0).normal(size=(3, 8, 2)).astype(np.float32)
  bb = np.random.default_rng(1).normal(size=(3, 2, 4, 5)).astype(np.float32)
  got = tau_lib.lora_delta(a, bb, 0.5, w_ndim=4)
  for i in range(3):
    np.testing.assert_allclose(got[i], 0.5 * np.tensordot(a[i], bb[i], axes=1), rtol=1e-5)
  config = _config(**{"model.scan_layers": True})
  ctx, _, state = _setup(config)
  assert ctx.layout.tau.specs[0].stacked and ctx.layout.tau.specs[0].keys[0] == "layers"
  b = _batch(config, (NEW,))
  np.testing.assert_array_equal(_logits(ctx, state.params, b),
                                _logits(ctx, state.params["sigma"], b))


# ------------------------------------------------------------------ routing


def test_routing_sigma_update_exactly_zero_on_new_rows_and_tau_on_replay_rows():
  # Pure routing (no idle-update skipping, no weight decay): zero comes from the gradients.
  config = _config(**ROUTING)
  ctx, step, state = _setup(config)
  s_new, m = _run(ctx, step, state, _batch(config, (NEW,)))
  assert float(m["grad_norm_sigma"]) == 0.0 and float(m["grad_norm_tau"]) > 0
  assert _equal(s_new.params["sigma"], state.params["sigma"])
  assert not _equal(s_new.params["tau"], state.params["tau"])

  ctx, step, state = _setup(config)
  s_rep, m = _run(ctx, step, state, _batch(config, (REPLAY,)))
  assert float(m["grad_norm_tau"]) == 0.0 and float(m["grad_norm_sigma"]) > 0
  assert _equal(s_rep.params["tau"], state.params["tau"])
  assert not _equal(s_rep.params["sigma"], state.params["sigma"])



def test_distill_kl_routes_to_sigma_only():
  config = _config(**{"objective.lambda_kd": 1.0, "decomposition.skip_idle_updates": False,
                      "optimizer.weight_decay": 0.0,
                      "train.init_checkpoint": "unused"})  # KD validation wants a teacher
  ctx, step, state = _setup(config)
  teacher = jax.tree.map(lambda x: x * 1.05, ctx.layout.merge(state.params))
  state = state.replace(frozen={"teacher": teacher})
  b = _batch(config, (DISTILL,))
  b["distill_index"] = step_lib.distill_index(b["roles"], 1)
  s2, m = _run(ctx, step, state, b)
  assert float(m["kd_term"]) > 0 and float(m["grad_norm_sigma"]) > 0
  assert float(m["grad_norm_tau"]) == 0.0
  assert _equal(s2.params["tau"], state.params["tau"])


def test_starting_model_of_a_decomposed_state_is_its_model_shaped_teacher():
  """M for online replay scoring: the kept teacher (model-shaped, never merged), copied."""
  config = _config(**{"objective.lambda_kd": 1.0, "train.init_checkpoint": "unused"})
  ctx, _, state = _setup(config)
  teacher = jax.tree.map(lambda x: x * 1.05, ctx.layout.merge(state.params))
  state = state.replace(frozen={"teacher": teacher})
  got = context_lib.reference_params(ctx, state)
  assert set(got) == set(state.params["sigma"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(teacher))
  assert jax.tree.leaves(got)[0] is not jax.tree.leaves(teacher)[0]  # a copy: steps donate


def test_skip_idle_updates_keeps_update_zero_with_momentum_and_weight_decay():
  config = _config(**{"optimizer.weight_decay": 0.1})  # skip_idle_updates defaults to True
  ctx, step, state = _setup(config)
  state, _ = _run(ctx, step, state, _batch(config, (NEW, REPLAY)))  # moments now non-zero
  s2, m = _run(ctx, step, state, _batch(config, (NEW,), seed=1))
  assert float(m["stepped_sigma"]) == 0.0 and float(m["stepped_tau"]) == 1.0
  assert _equal(s2.params["sigma"], state.params["sigma"])
  # Control: without skipping, Adam momentum alone moves sigma on the same batch.
  config = _config(**ROUTING)
  ctx, step, state = _setup(config)
  state, _ = _run(ctx, step, state, _batch(config, (NEW, REPLAY)))
  s2, m = _run(ctx, step, state, _batch(config, (NEW,), seed=1))
  assert float(m["grad_norm_sigma"]) == 0.0
  assert not _equal(s2.params["sigma"], state.params["sigma"])


def test_frozen_sigma_has_no_optimizer_state_and_bytes_are_reported():
  config = _config(**{"decomposition.freeze_sigma": True, "decomposition.routing": False})
  ctx, step, state = _setup(config)
  assert set(state.opt_state) == {"tau"}
  sb = ctx.layout.state_bytes(state.params, state.opt_state)
  assert sb["opt_state"]["sigma"] == 0
  tau_bytes = sb["params"]["tau"]
  assert 2 * tau_bytes <= sb["opt_state"]["tau"] <= 2 * tau_bytes + 64  # Adam mu, nu + counts
  assert sb["trainable_params"] == tau_bytes // 4
  assert sb["params"]["sigma"] == sum(x.size * x.dtype.itemsize
                                      for x in jax.tree.leaves(state.params["sigma"]))
  s2, m = _run(ctx, step, state, _batch(config, (NEW, REPLAY)))
  assert _equal(s2.params["sigma"], state.params["sigma"])
  assert not _equal(s2.params["tau"], state.params["tau"])
  plain = context_lib.build_context(_config(mode=""), jax.devices()[:1]).layout
  full = plain.state_bytes(state.params["sigma"],
                           jax.eval_shape(plain.tx.init, state.params["sigma"]))
  assert full["opt_state"]["model"] > 10 * sb["opt_state"]["tau"]


def test_subtree_tau_freezes_base_leaves_without_optimizer_state():
  config = _config("subtree", **{"decomposition.targets": r"layers_\d+/mlp/"})
  ctx, step, state = _setup(config)
  assert len(ctx.layout.tau.specs) == 6
  sb = ctx.layout.state_bytes(state.params, state.opt_state)
  assert sb["opt_state"]["sigma"] < 2 * (sb["params"]["sigma"] - sb["params"]["tau"]) + 256
  s2, _ = _run(ctx, step, state, _batch(config, (NEW, REPLAY)))
  for i in range(2):
    before, after = state.params["sigma"][f"layers_{i}"], s2.params["sigma"][f"layers_{i}"]
    assert _equal(after["mlp"], before["mlp"])  # base of tau: frozen
    assert not _equal(after["attn"], before["attn"])  # sigma proper trains
    assert not _equal(s2.params["tau"][f"layers_{i}"], state.params["tau"][f"layers_{i}"])


def test_subtree_routing_takes_the_second_pull_back_only_with_old_rows():
  """With a delta on a norm scale (not a Dense kernel) subtree routing's sigma gradient is a
  second pull-back: taken (and its rows counted for the budget) on a step with replay
  rows, skipped on a step of new rows only."""
  config = _config("subtree", **{"decomposition.targets": r"layers_\d+/(mlp/|mlp_norm)",
                                 **ROUTING})
  ctx, step, state = _setup(config)
  assert not ctx.layout.tau.on_kernels_only
  rows = config.train.global_batch_size
  s_mixed, m_mixed = _run(ctx, step, state, _batch(config, (NEW, REPLAY)))
  s_new, m_new = _run(ctx, step, state, _batch(config, (NEW, NEW)))
  assert int(m_mixed["pullback_rows"]) == rows and int(m_new["pullback_rows"]) == 0
  assert float(m_mixed["grad_norm_sigma"]) > 0 and float(m_new["grad_norm_sigma"]) == 0.0
  assert not _equal(s_mixed.params["sigma"]["layers_0"]["attn"],
                    state.params["sigma"]["layers_0"]["attn"])
  assert _equal(s_new.params["sigma"], state.params["sigma"])  # no gradient, no momentum yet


def test_subtree_deltas_on_kernels_route_in_one_backward():
  """Deltas on Dense kernels only: one backward routes both groups, so no second
  pull-back is taken or counted, and both groups still train on a mixed step."""
  config = _config("subtree", **{"decomposition.targets": r"layers_\d+/mlp/", **ROUTING})
  ctx, step, state = _setup(config)
  assert ctx.layout.tau.on_kernels_only
  s_mixed, m = _run(ctx, step, state, _batch(config, (NEW, REPLAY)))
  assert int(m.get("pullback_rows", 0)) == 0
  assert float(m["grad_norm_sigma"]) > 0 and float(m["grad_norm_tau"]) > 0
  assert not _equal(s_mixed.params["sigma"]["layers_0"]["attn"],
                    state.params["sigma"]["layers_0"]["attn"])
  assert _equal(s_mixed.params["sigma"]["layers_0"]["mlp"],
                state.params["sigma"]["layers_0"]["mlp"])  # frozen under the deltas
  assert not _equal(s_mixed.params["tau"], state.params["tau"])


def test_one_device_equals_2x2x2_mesh():
  config = _config(**ROUTING)
  ctx1, step1, state1 = _setup(config)
  config8 = _config(**ROUTING, **{"sharding.mesh_shape": (2, 2, 2)})
  ctx8, step8, state8 = _setup(config8, jax.devices())
  lora_b = state8.params["tau"]["layers_0"]["attn"]["q"]["kernel"]["lora_b"]
  assert len(lora_b.sharding.device_set) == 8
  for seed in range(2):
    b = _batch(config, (NEW, REPLAY), seed)
    state1, m1 = _run(ctx1, step1, state1, b)
    state8, m8 = _run(ctx8, step8, state8, b)
    np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), atol=1e-5)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=2e-5),
               jax.device_get(state1.params), jax.device_get(state8.params))


# ------------------------------------------------------------------ trainer: resume, stages


def test_trainer_resume_warm_start_and_merge(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")

  def cfg(**kw):
    c = _config(**kw)
    c.data.corpus_dir = str(corpus)
    c.train.update(steps=4, checkpoint_every=2, log_every=2, eval_batches=1)
    return c

  base = cfg(mode="", **{"train.steps": 2})
  stages.train(base, str(tmp_path / "base"), devices=jax.devices()[:1])
  # Decomposed stage warm-started from a plain checkpoint: sigma = base params, tau fresh.
  # (grad accumulation on, to cover the accumulated decomposed step)
  lora = cfg(**{"train.init_checkpoint": str(tmp_path / "base"), "train.grad_accum_steps": 2})
  t = stages.make_trainer(lora, str(tmp_path / "lora"), devices=jax.devices()[:1])
  summary = t.run()
  t.close()
  assert summary["init"].startswith("warm start")
  assert summary["state_bytes"]["params"]["tau"] > 0
  assert set(summary["eval_without_tau"]) == set(summary["eval"])
  rec = metrics_lib.read_metrics(tmp_path / "lora")[-1]
  assert rec["state_bytes"]["opt_state"]["tau"] > 0 and "grad_norm_tau" in rec
  ref = rec["loss"]

  # Resume: drop the final checkpoint and run again from step 2.
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path / "lora" / "checkpoints" / "4")
  resumed = stages.train(lora, str(tmp_path / "lora"), devices=jax.devices()[:1])
  assert resumed["init"] == "resumed from step 2"
  assert metrics_lib.read_metrics(tmp_path / "lora")[-1]["loss"] == pytest.approx(ref, abs=1e-6)

  # A plain stage after the LoRA stage starts from the merged model.
  plain = cfg(mode="", **{"train.init_checkpoint": str(tmp_path / "lora")})
  t2 = stages.make_trainer(plain, str(tmp_path / "after"), devices=jax.devices()[:1])
  state, _, _ = t2.initial_state()
  t2.close()
  merged = t.ctx.model_params(jax.device_get(t.state.params))
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6),
               jax.device_get(state.params), merged)
  exported = export_lib.restore_for_export(str(tmp_path / "lora"), t.ctx.model_cfg)  # export merges
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6),
               jax.device_get(exported), merged)
  with open(tmp_path / "lora" / "config.json", encoding="utf-8") as f:
    assert json.load(f)["decomposition"]["mode"] == "lora"


def test_config_validation():
  c = _config(**{"decomposition.mode": "adapter"})
  with pytest.raises(ValueError, match="decomposition.mode"):
    config_lib.validate_config(c)
  c = _config(**{"decomposition.targets": "no_such_param"})
  with pytest.raises(ValueError, match="matches no parameter"):
    context_lib.build_context(c, jax.devices()[:1])
  variants = suite_lib.decomposition_variants()
  assert set(variants) == {"full", "lora_tau", "sigma_tau_routing"}
  for overrides in variants.values():
    c = _config(mode="")
    for key, value in overrides.items():
      group, name = key.split(".")
      c[group][name] = value
    config_lib.validate_config(c)
