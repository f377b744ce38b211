"""Train-step tests: 1 device vs a 2x2x2 mesh, overfitting, gradient accumulation."""

import jax
import numpy as np
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import context as context_lib
from cpt_jax.train import objective, state as state_lib, step as step_lib
from tests.helpers import tiny_config


def _setup(config, devices):
  ctx = context_lib.build_context(config, devices)
  loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, num_domains=3)
  step = step_lib.make_train_step(loss_fn, ctx.layout, config.train.grad_accum_steps)
  jitted = step_lib.jit_train_step(step, ctx.state_sh, ctx.mesh, ctx.rules)
  state = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, config.seed,
                               config.data.seq_len)
  return ctx, jitted, state


def _batch(config, seed=0):
  return batch_lib.synthetic_batch(np.random.default_rng(seed), config.train.global_batch_size,
                                   config.data.seq_len, config.model.vocab_size, num_domains=3)


def test_one_device_equals_2x2x2_mesh():
  assert jax.device_count() == 8, "conftest forces 8 CPU devices"
  config = tiny_config()
  config.sharding.mesh_shape = (1, 1, 1)
  ctx1, step1, state1 = _setup(config, jax.devices()[:1])
  config8 = tiny_config()
  config8.sharding.mesh_shape = (2, 2, 2)
  ctx8, step8, state8 = _setup(config8, jax.devices())
  # Parameters really are sharded on the 8-device mesh.
  up = state8.params["layers_0"]["mlp"]["up"]["kernel"]
  assert len(up.sharding.device_set) == 8 and up.addressable_shards[0].data.shape == (16, 32)
  for seed in range(2):
    b = _batch(config, seed)
    state1, m1 = step1(state1, shd.global_batch(b, ctx1.mesh))
    state8, m8 = step8(state8, shd.global_batch(b, ctx8.mesh))
    np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), atol=1e-5)
  p1, p8 = jax.device_get(state1.params), jax.device_get(state8.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p8)
  np.testing.assert_allclose(m1["domain_ce_sum"], m8["domain_ce_sum"], rtol=1e-5)


def test_overfits_one_batch():
  config = tiny_config()
  config.optimizer.update(lr=1e-2, warmup_steps=1, weight_decay=0.0)
  config.train.steps = 60
  ctx, step, state = _setup(config, jax.devices()[:1])
  b = shd.global_batch(_batch(config), ctx.mesh)
  losses = []
  for _ in range(60):
    state, m = step(state, b)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_grad_accumulation_matches_full_batch():
  config = tiny_config()
  ctx, step, state = _setup(config, jax.devices()[:1])
  config2 = tiny_config(**{"train.grad_accum_steps": 2})
  _, step2, state2 = _setup(config2, jax.devices()[:1])
  b = _batch(config)
  b["loss_weights"][:] = 1.0  # equal tokens per microbatch: means of means are exact
  state, m = step(state, shd.global_batch(b, ctx.mesh))
  state2, m2 = step2(state2, shd.global_batch(b, ctx.mesh))
  np.testing.assert_allclose(float(m["loss"]), float(m2["loss"]), rtol=1e-5)
  np.testing.assert_allclose(m["domain_tokens"], m2["domain_tokens"])
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=2e-5),
               jax.device_get(state.params), jax.device_get(state2.params))


def test_distill_index_buckets():
  roles = np.array([0, 2, 0, 2, 2, 0, 1, 0])
  idx = step_lib.distill_index(roles, grad_accum=1)
  assert idx.shape == (1, 1, 4) and idx[0, 0].tolist() == [1, 3, 4, -1]
  idx2 = step_lib.distill_index(roles, grad_accum=2)  # microbatches: rows 0,2,4,6 / 1,3,5,7
  assert idx2.shape == (2, 1, 2) and idx2[:, 0].tolist() == [[2, -1], [0, 1]]
  assert step_lib.distill_index(np.zeros(8, int), 1) is None


def test_distill_index_per_shard():
  """Indices within each device's block of rows; the bucket fits the fullest block."""
  roles = np.array([0, 2, 0, 2, 2, 0, 1, 0])
  # 4 blocks of 2 rows: (0, 2) (0, 2) (2, 0) (1, 0) -> distill rows 1, 1, 0 and none.
  idx = step_lib.distill_index(roles, grad_accum=1, shards=4)
  assert idx.tolist() == [[[1], [1], [0], [-1]]]
  # 2 blocks of 4 rows: rows 1, 3 in block 0; row 4 (index 0) in block 1.
  assert step_lib.distill_index(roles, 1, shards=2).tolist() == [[[1, 3], [0, -1]]]
  # Microbatch 0 = rows 0, 2, 4, 6 (roles 0 0 2 1), 1 = rows 1, 3, 5, 7 (2 2 0 0);
  # each cut into 2 blocks of 2.
  assert step_lib.distill_index(roles, 2, shards=2).tolist() == [[[-1, -1], [0, -1]],
                                                                 [[0, 1], [-1, -1]]]
  assert step_lib.distill_index(roles, 1, with_replay=True, shards=4).tolist() == \
      [[[1], [1], [0], [0]]]
  with pytest.raises(ValueError, match="do not split"):
    step_lib.distill_index(roles, 2, shards=3)


def test_microbatch_split_is_strided():
  x = np.arange(8)
  assert step_lib.microbatch_split(x, 2).tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
