"""How a run's trained parameters are laid out: one interface, plain or sigma / tau.

The objective, the state and the step see only this interface, so they have no
branch on the layout. A layout answers:

  boxed(model_boxed)              the trained params, shape-only with logical-axis boxes
  init(model_params, rng)         the trained params around model params (jit-safe)
  merge(params)                   the model params the forward runs on
  base(params)                    the model without this stage's delta
  regularized(params)             what L2-SP / EWC pull toward the teacher
  tx, schedule                    the optimizer and the learning-rate schedule logged
  opt_shardings(abstract_opt, param_sh, rep)   shardings of the optimizer state
  grads(loss_fn, params, batch, frozen) -> (grads, aux)   which loss each group follows
  apply(grads, state, aux) -> (params, opt_state, metrics)
  state_bytes(params, opt_state)  parameter / optimizer-state bytes per group

`Plain` is the model's own tree trained on the whole loss. The sigma / tau layout
(train/decomposition.py) routes the objective's two signals, aux['loss_new'] (the
new dataset's rows) and the rest of the loss (old domains, regularisers), to tau
and sigma. `decomposition.make_layout(config, model_boxed)` picks one from
`config.decomposition`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpt_jax import batch as batch_lib


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) in `tree`."""
  return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def tree_size(tree: Any) -> int:
  """Elements of the arrays (or ShapeDtypeStructs) in `tree`."""
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def signal_losses(loss: jax.Array, aux: dict) -> jax.Array:
  """[loss_new, loss_old]: the objective's two signals (train/objective.py), [2]."""
  return jnp.stack([aux["loss_new"], loss - aux["loss_new"]])


def old_signal_always(objective_cfg: Any) -> bool:
  """L2-SP / EWC: an old signal on every step, whatever rows the batch holds."""
  return bool(objective_cfg.l2sp > 0 or objective_cfg.ewc > 0)


def old_signal_grad(vjp_fn: Callable, batch: dict, old_always: bool, like: Any,
                    part: Callable = lambda g: g) -> tuple[Any, jax.Array]:
  """(part(d loss_old), rows): the second pull-back of `vjp_fn` (a vjp of
  `signal_losses`), taken only on a step with rows other than `new` (or `old_always`);
  without them d loss_old is exactly zero and zeros like `like` come back. rows: the
  batch's rows that went through it, [] int32 (aux['pullback_rows']: the loop adds their
  backward FLOPs to the stage's budget)."""
  has_old = jnp.any(batch["roles"] != batch_lib.NEW) | old_always
  g_old = jax.lax.cond(has_old,
                       lambda: part(vjp_fn(jnp.asarray([0.0, 1.0], jnp.float32))[0]),
                       lambda: jax.tree.map(jnp.zeros_like, like))
  return g_old, has_old.astype(jnp.int32) * batch["roles"].shape[0]



def two_signal_grads(loss_fn: Callable, params: Any, batch: dict, frozen: Any,
                     old_always: bool) -> tuple[dict, dict]:
  """({'new': d loss_new, 'old': d loss_old}, aux): one forward, T's pull-back, and the
  second pull-back only on steps with an old signal (`old_signal_grad`)."""
  def by_signal(p):
    loss, aux = loss_fn(p, batch, frozen)
    return signal_losses(loss, aux), aux

  _, vjp_fn, aux = jax.vjp(by_signal, params, has_aux=True)
  (g_new,) = vjp_fn(jnp.asarray([1.0, 0.0], jnp.float32))
  g_old, aux["pullback_rows"] = old_signal_grad(vjp_fn, batch, old_always, g_new)
  return {"new": g_new, "old": g_old}, aux

class Plain:
  """The model's params, one optimizer, gradients of the whole loss."""

  groups = ("model",)
  has_delta = False  # base(params) is the model itself

  def __init__(self, tx: optax.GradientTransformation, schedule: Callable):
    self.tx, self.schedule = tx, schedule

  def boxed(self, model_boxed: Any) -> Any:
    return model_boxed

  def init(self, model_params: Any, rng: jax.Array) -> Any:
    del rng
    return model_params

  def merge(self, params: Any) -> Any:
    return params

  def base(self, params: Any) -> Any:
    return params

  def regularized(self, params: Any) -> Any:
    return params

  def opt_shardings(self, abstract_opt: Any, param_sh: Any, rep: Any) -> Any:
    return optax.tree_utils.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: rep)

  def grads(self, loss_fn: Callable, params: Any, batch: dict, frozen: Any):
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, frozen)
    return grads, aux

  def apply(self, grads: Any, state: Any, aux: dict):
    del aux
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return params, opt_state, {"grad_norm": optax.tree.norm(grads),
                               "update_norm": optax.tree.norm(updates)}

  def state_bytes(self, params: Any, opt_state: Any) -> dict:
    return {"params": {"model": tree_bytes(params)}, "opt_state": {"model": tree_bytes(opt_state)},
            "trainable_params": tree_size(params)}
