"""The KD step on an 8-device FSDP mesh: teacher rows are gathered where they are.

The teacher's rows (distill rows, replay rows under replay KD) sit unevenly over
the devices that hold the batch's rows. Loss and gradients must equal the
1-device step's, and no collective of the compiled step may carry logits of
whole rows ([..., L, V]): gathering the teacher's rows across devices made
every device hold every teacher row's full-vocabulary logits.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import context as context_lib
from cpt_jax.train import layout as layout_lib
from cpt_jax.train import objective, state as state_lib, step as step_lib
from tests.helpers import tiny_config

B, L, V = 16, 24, 1000  # L and V are no parameter's dimensions
NEW, REPLAY, DISTILL = batch_lib.NEW, batch_lib.REPLAY, batch_lib.DISTILL
# 8 blocks of 2 rows: block 0 holds two distill rows, block 3 one, block 2 and
# block 6 a replay row each, the other blocks none of the teacher's rows.
ROLES = np.full(B, NEW, np.int32)
ROLES[[0, 1, 7]] = DISTILL
ROLES[[4, 13]] = REPLAY
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")


def _config(topk, features=0.0):
  c = tiny_config()
  c.model.vocab_size = V
  c.data.seq_len = L
  c.train.global_batch_size = B
  c.sharding.mesh_shape = (1, -1, 1)
  c.objective.update(lambda_replay=0.5, lambda_kd=1.5, replay_kd=0.7, kd_temperature=2.0,
                     kd_topk=topk, replay_features=features)
  c.train.init_checkpoint = "teacher"  # only satisfies validation: the test builds the teacher
  return c


def _host_inputs(config):
  """(params, teacher, batch) as host arrays, the same for every mesh."""
  ctx = context_lib.build_context(config, jax.devices()[:1])
  params = jax.device_get(state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh,
                                               config.seed, L).params)
  rng = np.random.default_rng(5)
  teacher = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), params)
  b = batch_lib.synthetic_batch(np.random.default_rng(3), B, L, V, num_domains=3,
                                docs_per_row=3)
  b["roles"] = ROLES.copy()
  for i in range(B):  # every row keeps a different number of loss tokens
    b["loss_weights"][i, L - 1 - i:] = 0.0
  return params, teacher, b


def _collective_shapes(hlo_text):
  """The dimensions of every array a collective of `hlo_text` produces."""
  out = []
  for m in _COLLECTIVE.finditer(hlo_text):
    out += [tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
  return out


def _step(config, devices, grad_accum, host):
  """(grads, metrics, compiled HLO text) of one SGD(1) step: grads = params before - after."""
  config = config.copy_and_resolve_references()
  config.train.grad_accum_steps = grad_accum
  ctx = context_lib.build_context(config, devices)
  params, teacher, b = host
  params = jax.device_put(params, ctx.model_sh)
  teacher = jax.device_put(teacher, ctx.model_sh)
  layout = layout_lib.Plain(optax.sgd(1.0), lambda s: 1.0)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=layout.tx.init(params), frozen={"teacher": teacher})
  loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, 3, layout=layout,
                                   features_fn=ctx.features_fn)
  step = step_lib.make_train_step(loss_fn, layout, grad_accum)
  batch = shd.global_batch(b, ctx.mesh)
  idx = step_lib.distill_index(b["roles"], grad_accum, with_replay=True,
                               shards=shd.data_parallel_size(ctx.mesh))
  batch["distill_index"] = step_lib.device_distill_index(idx, ctx.mesh)
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    compiled = jax.jit(step).lower(state, batch).compile()
    new_state, metrics = compiled(state, batch)
  grads = jax.tree.map(lambda a, c: a - c, params, new_state.params)
  return jax.device_get(grads), jax.device_get(metrics), compiled.as_text()


@pytest.fixture(scope="module", params=[(0, 0.0), (5, 0.0), (0, 2.0)],
                ids=["full", "top5", "full+features"])
def one_device(request):
  config = _config(*request.param)
  host = _host_inputs(config)
  return config, host, _step(config, jax.devices()[:1], 1, host)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_fsdp8_kd_step_equals_one_device_without_moving_logits(one_device, grad_accum):
  config, host, (g1, m1, _) = one_device
  assert len(jax.devices()) >= 8
  g8, m8, hlo = _step(config, jax.devices()[:8], grad_accum, host)
  assert m8["kd_tokens"] > 0 and m8["replay_kd_term"] > 0
  features = config.objective.replay_features > 0
  for key in ("loss", "ce_term", "kd_term", "replay_kd_term", "kd_tokens") + \
      (("replay_features_term",) if features else ()):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4), g8, g1)
  shapes = _collective_shapes(hlo)
  assert shapes, "the 8-device step has no collectives: the HLO pattern is stale"
  moved = [s for s in shapes if any(s[i:i + 2] == (L, V) for i in range(len(s)))]
  assert not moved, f"collectives carry rows' logits [..., L, V]: {moved}"
  if features:  # nor the rows' block outputs [..., L, D]
    d = config.model.d_model
    moved = [s for s in shapes if any(s[i:i + 2] == (L, d) for i in range(len(s)))]
    assert not moved, f"collectives carry rows' block outputs [..., L, D]: {moved}"
  # Slots as run, padding included: 2 per block at A = 1 (block 0 has two rows), 1 per
  # block and microbatch at A = 2 (5 rows in all).
  assert int(m8["teacher_rows"]) == 8 * grad_accum * (2 if grad_accum == 1 else 1)
