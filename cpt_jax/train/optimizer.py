"""AdamW with global-norm clipping, a weight-decay mask and LR schedules.

Schedules (`optimizer.schedule`):
  constant      warmup to `lr`, then flat.
  cosine        linear warmup 0 -> lr, cosine decay to lr * final_lr_fraction.
  rewarm_cosine continued pre-training: warm up from `init_lr` (the LR the
                previous stage ended at) to a new peak `lr`, then cosine decay
                to the floor lr * final_lr_fraction.
  wsd           warmup-stable-decay: warmup, flat at `lr`, then a linear decay
                over the last `decay_fraction` of the steps to the floor.

`optimizer.lookahead_every` k > 0 adds `lookahead`: every k steps the weights move
back to slow + alpha (fast - slow) (Lookahead, Zhang et al. 2019; Reptile across
successive batches, the meta-experience replay of continual pre-training).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cpt_jax import config as config_lib

SCHEDULES = config_lib.LR_SCHEDULES


def make_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
  """Builds the learning-rate schedule named by `optimizer.schedule`."""
  peak = float(opt_cfg.lr)
  floor = peak * float(opt_cfg.final_lr_fraction)
  warmup = int(opt_cfg.warmup_steps)
  total_steps = max(int(total_steps), warmup + 1)
  name = opt_cfg.schedule
  if name == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
        [warmup])
  if name in ("cosine", "rewarm_cosine"):
    start = float(opt_cfg.init_lr) if name == "rewarm_cosine" else 0.0
    return optax.warmup_cosine_decay_schedule(
        init_value=start, peak_value=peak, warmup_steps=warmup,
        decay_steps=total_steps, end_value=floor)
  if name == "wsd":
    decay = max(1, int(round(total_steps * float(opt_cfg.decay_fraction))))
    stable = max(0, total_steps - warmup - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)),
         optax.constant_schedule(peak),
         optax.linear_schedule(peak, floor, decay)],
        [warmup, warmup + stable])
  raise ValueError(f"optimizer.schedule={name!r}; expected one of {SCHEDULES}")


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params: Any, decay_embeddings: bool, no_decay_pattern: str) -> Any:
  """True where weight decay applies: kernels; never norms/biases (regex)."""
  pattern = re.compile(no_decay_pattern)

  def leaf(path, _):
    name = _path_str(path)
    if pattern.search(name):
      return False
    if not decay_embeddings and "embed/embedding" in name:
      return False
    return True

  return jax.tree_util.tree_map_with_path(leaf, params)


class LookaheadState(NamedTuple):
  count: jax.Array  # [] int32: steps taken
  slow: Any  # the params' tree: where the current run of fast steps began


def lookahead(every: int, alpha: float) -> optax.GradientTransformation:
  """Last in a chain: turns the inner update into Lookahead's.

  Steps 1..k-1 of each period pass the update through (fast weights); step k returns the
  update that lands on slow + alpha * (fast - slow), which becomes the next period's slow
  weights. alpha 1 is the inner optimizer; smaller alpha keeps what successive batches
  agree on. Needs `params`; keeps one copy of them.
  """
  if every < 1 or not 0.0 < alpha <= 1.0:
    raise ValueError(f"lookahead(every={every}, alpha={alpha}): need every >= 1, 0 < alpha <= 1")

  def init(params):
    return LookaheadState(jnp.zeros([], jnp.int32),
                          jax.tree.map(lambda p: jnp.array(p, copy=True), params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("lookahead needs params in update()")
    count = state.count + 1
    sync = count % every == 0

    def leaf(u, p, s):
      target = s + alpha * (p + u - s)
      return jnp.where(sync, target - p, u).astype(u.dtype), jnp.where(sync, target, s)

    pairs = jax.tree.map(leaf, updates, params, state.slow)
    outer = jax.tree.structure(updates)
    new_updates, slow = jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)
    return new_updates, LookaheadState(count, slow)

  return optax.GradientTransformation(init, update)


def make_optimizer(opt_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW + clipping; returns (transformation, lr schedule)."""
  schedule = make_schedule(opt_cfg, total_steps)
  mask_fn = lambda p: decay_mask(p, bool(opt_cfg.decay_embeddings), opt_cfg.no_decay_pattern)
  parts = []
  if float(opt_cfg.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(opt_cfg.clip_norm)))
  parts.append(optax.adamw(
      learning_rate=schedule, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2),
      eps=float(opt_cfg.eps), weight_decay=float(opt_cfg.weight_decay), mask=mask_fn))
  if int(opt_cfg.get("lookahead_every", 0)) > 0:
    parts.append(lookahead(int(opt_cfg.lookahead_every), float(opt_cfg.lookahead_alpha)))
  return optax.chain(*parts), schedule
