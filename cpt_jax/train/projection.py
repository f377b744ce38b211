"""Gradient projection between the two signals (`objective.projection`).

The objective splits into loss_new (the new dataset's rows) and loss_old (replay
rows, distillation, L2-SP / EWC; objective.py). With a projection the layout
takes both gradients, g_new = d loss_new / d theta and g_old = d loss_old / d
theta (one forward, two pull-backs of it; the second only on steps with an old
signal), and when they conflict (<g_new, g_old> < 0, over the whole tree)
removes the conflicting component before they are added:

  'old'   g_old -= <g_new, g_old> / |g_new|^2 g_new   the old signal never opposes T's
                                                      first-order gain (T-first)
  'new'   g_new -= <g_new, g_old> / |g_old|^2 g_old   T's step never raises the old
                                                      loss to first order (A-GEM,
                                                      Chaudhry et al. 2019)
  'both'  both, each against the other's original     PCGrad (Yu et al. 2020)

then the update is the optimizer's on g_new + g_old. Without a conflict the
gradient is the plain one. The projection acts on the whole step's gradients, so
under gradient accumulation each microbatch returns its two gradients
(`grads` -> {'new', 'old'}, summed over microbatches by the step) and `apply`
projects their sums. Metrics: `grad_cosine` (cosine of g_new and g_old on steps
with an old signal) and `grad_conflict` (1 when the projection acted).

Cost: a second pull-back (about 2/3 of a plain step's FLOPs) on the steps that
hold old-signal rows; steps without them take one. aux['pullback_rows'] counts the
rows of the second pull-backs; the loop adds their backward FLOPs to the stage's
budget (part 'second_pullback') and summary (`pullback_tflops`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from cpt_jax import config as config_lib
from cpt_jax.train import layout as layout_lib

MODES = config_lib.PROJECTIONS


def tree_vdot(a: Any, b: Any) -> jax.Array:
  """sum over leaves of <a, b> in float32: a scalar."""
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def project(g_new: Any, g_old: Any, mode: str) -> tuple[Any, dict]:
  """(g_new' + g_old', metrics) with the conflicting component removed per `mode`."""
  if mode not in MODES[1:]:
    raise ValueError(f"objective.projection={mode!r}; expected one of {MODES}")
  dot = tree_vdot(g_new, g_old)
  nn2, oo2 = tree_vdot(g_new, g_new), tree_vdot(g_old, g_old)
  conflict = dot < 0
  tiny = jnp.finfo(jnp.float32).tiny

  def minus(g, other, coef):
    c = jnp.where(conflict, coef, 0.0)
    return jax.tree.map(lambda x, y: x - (c * y.astype(jnp.float32)).astype(x.dtype), g, other)

  new_p = minus(g_new, g_old, dot / jnp.maximum(oo2, tiny)) if mode in ("new", "both") \
      else g_new
  old_p = minus(g_old, g_new, dot / jnp.maximum(nn2, tiny)) if mode in ("old", "both") \
      else g_old
  has_old = oo2 > 0
  cosine = jnp.where(has_old, dot / jnp.sqrt(jnp.maximum(nn2 * oo2, tiny)), 0.0)
  metrics = {"grad_cosine": cosine, "grad_conflict": conflict.astype(jnp.float32)}
  return jax.tree.map(jnp.add, new_p, old_p), metrics


class Projected(layout_lib.Plain):
  """The model's params and one optimizer, with g_new and g_old projected (see above)."""

  def __init__(self, tx, schedule, mode: str, objective_cfg: Any):
    super().__init__(tx, schedule)
    self.mode = mode
    self.old_always = layout_lib.old_signal_always(objective_cfg)

  def grads(self, loss_fn: Callable, params: Any, batch: dict, frozen: Any):
    return layout_lib.two_signal_grads(loss_fn, params, batch, frozen, self.old_always)

  def apply(self, grads: dict, state: Any, aux: dict):
    g, metrics = project(grads["new"], grads["old"], self.mode)
    params, opt_state, extra = super().apply(g, state, aux)
    return params, opt_state, {**extra, **metrics}

