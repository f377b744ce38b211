"""The jit-compiled, sharded train step (with gradient accumulation)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    grad_accum: int = 1, grads_fn: Callable | None = None,
                    apply_fn: Callable | None = None,
                    normalisers_fn: Callable = objective.normalisers) -> Callable:
  """step(state, batch) -> (state, metrics); pure, jit it with `jit_train_step`.

  loss_fn(params, batch, frozen, norms) -> (loss, aux), with `norms` the
  normalisers of the whole batch (`normalisers_fn(batch)`, see objective.py).
  With grad_accum = A > 1 the batch is cut into A microbatches (see
  `microbatch_split`); `batch['distill_index']` is then [A, Bd] with indices
  local to each microbatch ([1, Bd] when A = 1). Each microbatch's loss
  divides by the whole batch's token counts and carries 1/A of the
  parameter-only terms, so the summed losses, gradients and aux entries equal
  the A = 1 step's on the same batch.

  Hooks (sigma / tau decomposition, see decomposition.py): grads_fn(loss_fn, params,
  batch, frozen) -> (grads, aux) replaces value_and_grad (grads may cover only part of
  params); apply_fn(grads, state, aux) -> (params, opt_state, metrics) replaces
  tx.update + apply_updates.
  """

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    norms = dict(normalisers_fn(batch))
    norms["param_share"] = jnp.asarray(1.0 / grad_accum, jnp.float32)
    micro_loss_fn = functools.partial(loss_fn, norms=norms)

    def grads_and_aux(params, mb, frozen):
      if grads_fn is not None:
        return grads_fn(micro_loss_fn, params, mb, frozen)
      (_, aux), grads = jax.value_and_grad(micro_loss_fn, has_aux=True)(params, mb, frozen)
      return grads, aux

    if grad_accum == 1:
      mb = dict(batch)
      if "distill_index" in mb:
        mb["distill_index"] = mb["distill_index"][0]
      grads, aux = grads_and_aux(state.params, mb, state.frozen)
    else:
      micro = {k: (v if k == "distill_index" else microbatch_split(v, grad_accum))
               for k, v in batch.items()}
      grads_shape, aux_shape = jax.eval_shape(
          grads_and_aux, state.params, jax.tree.map(lambda x: x[0], micro), state.frozen)
      zero_grads = (jax.tree.map(jnp.zeros_like, state.params) if grads_fn is None else
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grads_shape))
      zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)

      def body(carry, mb):
        g_acc, a_acc = carry
        g, a = grads_and_aux(state.params, mb, state.frozen)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, a_acc, a)), None

      # Every microbatch's loss is already over the whole batch's normalisers:
      # gradients and aux entries add up.
      (grads, aux), _ = jax.lax.scan(body, (zero_grads, zero_aux), micro)

    if apply_fn is not None:
      params, opt_state, extra = apply_fn(grads, state, aux)
      aux.update(extra)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      aux["grad_norm"] = optax.global_norm(grads)
      aux["update_norm"] = optax.global_norm(updates)
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
  """Host-side: [A, Bd] indices of the teacher's rows per microbatch, or None if none.

  The teacher's rows are the distill rows if `with_distill` (objective.lambda_kd
  > 0) and the replay rows if `with_replay` (objective.replay_kd > 0).

  Bd is rounded up to a power of two (>= min_bucket) so only a few step
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
