"""The jit-compiled, sharded train step (with gradient accumulation)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from cpt_jax import batch as batch_lib
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import objective
from cpt_jax.train.state import TrainState


def microbatch_split(x_BxX: jax.Array, num_micro: int) -> jax.Array:
  """[B, ...] -> [A, B/A, ...] with microbatch m = rows m, A+m, 2A+m, ...

  Strided (not contiguous) so every device's shard contributes to every
  microbatch and no resharding is needed.
  """
  b = x_BxX.shape[0]
  return x_BxX.reshape(b // num_micro, num_micro, *x_BxX.shape[1:]).swapaxes(0, 1)


def make_train_step(loss_fn: Callable, layout: Any, grad_accum: int = 1,
                    normalisers_fn: Callable = objective.normalisers) -> Callable:
  """step(state, batch) -> (state, metrics); pure, jit it with `jit_train_step`.

  loss_fn(params, batch, frozen, norms) -> (loss, aux), with `norms` the
  normalisers of the whole batch (`normalisers_fn(batch)`, see objective.py).
  layout (train/layout.py) takes the gradients (`layout.grads`: which loss each
  parameter group follows) and applies the update (`layout.apply`).
  With grad_accum = A > 1 the batch is cut into A microbatches (see
  `microbatch_split`); `batch['distill_index']` is then [A, N] with indices
  local to each microbatch ([1, N] when A = 1). Each microbatch's loss
  divides by the whole batch's token counts and carries 1/A of the
  parameter-only terms, so the summed losses, gradients and aux entries equal
  the A = 1 step's on the same batch.
  """

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    norms = dict(normalisers_fn(batch))
    norms["param_share"] = jnp.asarray(1.0 / grad_accum, jnp.float32)
    micro_loss_fn = functools.partial(loss_fn, norms=norms)

    def grads_and_aux(params, mb, frozen):
      return layout.grads(micro_loss_fn, params, mb, frozen)

    if grad_accum == 1:
      mb = dict(batch)
      if "distill_index" in mb:
        mb["distill_index"] = mb["distill_index"][0]
      grads, aux = grads_and_aux(state.params, mb, state.frozen)
    else:
      micro = {k: (v if k == "distill_index" else microbatch_split(v, grad_accum))
               for k, v in batch.items()}
      shapes = jax.eval_shape(
          grads_and_aux, state.params, jax.tree.map(lambda x: x[0], micro), state.frozen)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def body(carry, mb):
        g, a = grads_and_aux(state.params, mb, state.frozen)
        return jax.tree.map(jnp.add, carry, (g, a)), None

      # Every microbatch's loss is already over the whole batch's normalisers:
      # gradients and aux entries add up.
      (grads, aux), _ = jax.lax.scan(body, zeros, micro)

    params, opt_state, extra = layout.apply(grads, state, aux)
    aux.update(extra)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, aux

  return step


def batch_shardings(mesh: Mesh, keys) -> dict[str, NamedSharding]:
  """Batch fields sharded by rows; `distill_index` replicated."""
  bsh, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
  return {k: (rep if k == "distill_index" else bsh) for k in keys}


def jit_train_step(step: Callable, state_sh: TrainState, mesh: Mesh, rules,
                   batch_keys=batch_lib.FIELDS) -> Callable:
  """jax.jit with in/out shardings and the state donated.

  The returned function traces under the mesh and logical axis rules, so the
  model's activation constraints resolve.
  """
  jitted = jax.jit(step, in_shardings=(state_sh, batch_shardings(mesh, batch_keys)),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,))

  def run(state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, batch)

  run.jitted = jitted
  return run


def distill_index(roles_B: np.ndarray, grad_accum: int, min_bucket: int = 1,
                  with_replay: bool = False, with_distill: bool = True) -> np.ndarray | None:
  """Host-side: [A, N] indices of the teacher's rows per microbatch, or None if none.

  The teacher's rows are the distill rows if `with_distill` (objective.lambda_kd
  > 0) and the replay rows if `with_replay` (objective.replay_kd > 0).

  N is rounded up to a power of two (>= min_bucket) so only a few step
  variants are ever compiled; unused slots are -1.
  """
  roles_B = np.asarray(roles_B)
  wanted = ((batch_lib.DISTILL,) if with_distill else ()) + \
      ((batch_lib.REPLAY,) if with_replay else ())
  per_micro = [np.nonzero(np.isin(roles_B[m::grad_accum], wanted))[0]
               for m in range(grad_accum)]
  most = max(len(ix) for ix in per_micro)
  if most == 0:
    return None
  rows = len(roles_B) // grad_accum
  bucket = min(max(min_bucket, 1 << (most - 1).bit_length()), rows)
  out = np.full((grad_accum, bucket), -1, np.int32)
  for m, ix in enumerate(per_micro):
    out[m, :len(ix)] = ix
  return out
