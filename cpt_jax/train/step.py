"""The jit-compiled, sharded train step (with gradient accumulation)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


def make_train_step(loss_fn: Callable, layout: Any, grad_accum: int = 1,
                    normalisers_fn: Callable = objective.normalisers) -> Callable:
  """step(state, batch) -> (state, metrics); pure, jit it with `jit_train_step`.

  loss_fn(params, batch, frozen, norms) -> (loss, aux), with `norms` the
  normalisers of the whole batch (`normalisers_fn(batch)`, see objective.py).
  layout (train/layout.py) takes the gradients (`layout.grads`: which loss each
  parameter group follows) and applies the update (`layout.apply`).
  With grad_accum = A > 1 the batch is cut into A microbatches (see
  `microbatch_split`). `batch['distill_index']` is [A, D, N] (see
  `distill_index`): microbatch m gets its [D, N]. Each microbatch's loss
  divides by the whole batch's token counts and carries 1/A of the
  parameter-only terms, so the summed losses, gradients and aux entries equal
  the A = 1 step's on the same batch.
  """

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    norms = dict(normalisers_fn(batch))
    norms["param_share"] = jnp.asarray(1.0 / grad_accum, jnp.float32)
    norms["step"] = state.step.astype(jnp.float32)  # for objective.replay_kd_ramp
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


def distill_index_sharding(mesh: Mesh) -> NamedSharding:
  """`distill_index` [A, D, N]: its D axis over the devices that hold the batch's rows."""
  return NamedSharding(mesh, P(None, *shd.batch_sharding(mesh).spec))


def batch_shardings(mesh: Mesh, keys) -> dict[str, NamedSharding]:
  """Batch fields sharded by rows; `distill_index` by its D axis, the same way."""
  bsh, dsh = shd.batch_sharding(mesh), distill_index_sharding(mesh)
  return {k: (dsh if k == "distill_index" else bsh) for k in keys}


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
                  with_replay: bool = False, with_distill: bool = True,
                  shards: int = 1) -> np.ndarray | None:
  """Host-side: [A, D, N] indices of the teacher's rows, or None if there are none.

  The teacher's rows are the distill rows if `with_distill` (objective.lambda_kd
  > 0) and the replay rows if `with_replay` (objective.replay_kd > 0).
  Microbatch m (rows m, A+m, ...: `microbatch_split`) is cut into D = `shards`
  contiguous blocks of B/(A D) rows, the rows each device holds under
  `batch_shardings` (D = `sharding.data_parallel_size(mesh)`); [m, d] lists the teacher's rows
  of block d by their index within the block, so the objective gathers them
  where they are.

  N, the most teacher rows of any block, is rounded up to a power of two (>=
  min_bucket, <= the block's rows) so only a few step variants are ever
  compiled; unused slots are -1.
  """
  roles_B = np.asarray(roles_B)
  if len(roles_B) % (grad_accum * shards):
    raise ValueError(f"{len(roles_B)} rows do not split into {grad_accum} microbatches "
                     f"of {shards} shards")
  wanted = ((batch_lib.DISTILL,) if with_distill else ()) + \
      ((batch_lib.REPLAY,) if with_replay else ())
  rows = len(roles_B) // (grad_accum * shards)
  # [A, D, rows]: microbatch m's rows, block by block.
  is_teacher_AxDxR = np.isin(microbatch_split(roles_B, grad_accum), wanted).reshape(
      grad_accum, shards, rows)
  most = int(is_teacher_AxDxR.sum(-1).max())
  if most == 0:
    return None
  bucket = min(max(min_bucket, 1 << (most - 1).bit_length()), rows)
  out = np.full((grad_accum, shards, bucket), -1, np.int32)
  for m in range(grad_accum):
    for d in range(shards):
      ix = np.nonzero(is_teacher_AxDxR[m, d])[0]
      out[m, d, :len(ix)] = ix
  return out


def device_distill_index(idx_AxDxN: np.ndarray, mesh: Mesh) -> jax.Array:
  """The host's `distill_index` (the same on every process) as a global array sharded
  by `distill_index_sharding`."""
  idx_AxDxN = np.asarray(idx_AxDxN, np.int32)
  return jax.make_array_from_callback(idx_AxDxN.shape, distill_index_sharding(mesh),
                                      lambda index: idx_AxDxN[index])
