"""Separate optimizer moments for the two signals (`optimizer.old_moments='separate'`).

The objective splits into loss_new (the new dataset's rows) and loss_old (replay
rows' CE, replay / distill KD, L2-SP / EWC; objective.py). With one AdamW both
gradients share its clipping and second moment: on a step whose few replay rows carry a
large KD gradient, the global norm and v rise and T's own step shrinks, even where the
two gradients do not conflict (the replay suite measured their cosine within +-0.015).
This layout takes both gradients (one forward, two pull-backs; the second only on steps
with an old signal, as `objective.projection` does) and gives each its own clipping and
AdamW moments:

  params += AdamW_new(g_new) + AdamW_old(g_old)

AdamW_new is `config.optimizer` (its weight decay applies once, here); AdamW_old is the
same without weight decay and with its learning rate scaled by `optimizer.old_lr_scale`.
Adam is invariant to a gradient's scale, so under this layout the old signal's strength
is set by `old_lr_scale`, not by the loss weights (replay_kd, lambda_replay: they only
weigh the old signal's parts against each other). On steps without an old signal g_old
is exactly zero and AdamW_old moves the params by its momentum, as a shared AdamW would.

State: opt_state = {'new': AdamW state, 'old': AdamW state}, twice a plain run's.
Cost: the second pull-back (about 2/3 of a plain step's FLOPs) on steps with old rows,
counted like the projection's (aux['pullback_rows'], budget part 'second_pullback').
Metrics: `grad_norm_new`, `grad_norm_old`, `update_norm_new`, `update_norm_old`.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cpt_jax.train import layout as layout_lib
from cpt_jax.train import optimizer as optimizer_lib

SIGNALS = ("new", "old")


def old_optimizer_config(opt_cfg: Any) -> Any:
  """`config.optimizer` for the old signal: lr x old_lr_scale, no weight decay."""
  out = copy.deepcopy(opt_cfg)
  out.lr = float(opt_cfg.lr) * float(opt_cfg.old_lr_scale)
  out.init_lr = float(opt_cfg.init_lr) * float(opt_cfg.old_lr_scale)
  out.weight_decay = 0.0
  return out


class SplitMoments(layout_lib.Plain):
  """The model's params, one AdamW per signal (see the module docstring)."""

  def __init__(self, opt_cfg: Any, total_steps: int, objective_cfg: Any):
    tx_new, schedule = optimizer_lib.make_optimizer(opt_cfg, total_steps)
    tx_old, _ = optimizer_lib.make_optimizer(old_optimizer_config(opt_cfg), total_steps)
    self.txs = {"new": tx_new, "old": tx_old}
    init = lambda params: {s: tx.init(params) for s, tx in self.txs.items()}
    super().__init__(optax.GradientTransformation(init, self._no_update), schedule)
    self.old_always = layout_lib.old_signal_always(objective_cfg)

  @staticmethod
  def _no_update(grads, state, params=None):
    raise NotImplementedError("SplitMoments updates through apply(): it needs both signals")

  def opt_shardings(self, abstract_opt: dict, param_sh: Any, rep: Any) -> dict:
    return {s: optax.tree_utils.tree_map_params(tx, lambda _, sh: sh, abstract_opt[s],
                                                param_sh, transform_non_params=lambda _: rep)
            for s, tx in self.txs.items()}

  def grads(self, loss_fn: Callable, params: Any, batch: dict, frozen: Any):
    return layout_lib.two_signal_grads(loss_fn, params, batch, frozen, self.old_always)

  def apply(self, grads: dict, state: Any, aux: dict):
    del aux
    params, opt_state, metrics = state.params, {}, {}
    total = None
    for s, tx in self.txs.items():
      updates, opt_state[s] = tx.update(grads[s], state.opt_state[s], state.params)
      total = updates if total is None else jax.tree.map(jnp.add, total, updates)
      metrics[f"grad_norm_{s}"] = optax.tree.norm(grads[s])
      metrics[f"update_norm_{s}"] = optax.tree.norm(updates)
    params = optax.apply_updates(params, total)
    metrics["grad_norm"] = optax.tree.norm(jax.tree.map(jnp.add, grads["new"],
                                                        grads["old"]))
    metrics["update_norm"] = optax.tree.norm(total)
    return params, opt_state, metrics
