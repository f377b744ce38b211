"""Divergence: a NaN / Inf loss or parameters, or a loss spike, and which checkpoint is good.

The loop (train/trainer.py) fetches every step's loss, and at every log or checkpoint
boundary whether the parameters are all finite (`all_finite`, jitted, fetched with that
step's metrics), so a non-finite state is never saved. `Guard` turns what it sees into
`Diverged(step, first_bad, reason)`, where `first_bad` is the first step whose loss is
suspect: the step of a non-finite loss, the step after non-finite parameters, or the
first step of a log window whose mean loss is above `train.loss_spike_factor` x the
previous window's.

A checkpoint at step s is good when the loss of step s + 1, computed from its
parameters, came before `first_bad` (`good_step`): finite parameters alone are not
enough, since exploded but finite parameters (|p| ~ 1e29) give NaN one step later.
`train.on_divergence='stop'` raises `DivergenceError` naming that step;
`'rollback'` reloads it and lets the data go on from where the divergence was found,
so the batches since that step are skipped, as PaLM and OPT did, at most
`train.max_rollbacks` times in a stage (the count is kept in checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp


class DivergenceError(FloatingPointError):
  """The run diverged and stops; the message names the newest good checkpoint."""


@dataclasses.dataclass
class Diverged(Exception):
  """Found at `step`: the loss from `first_bad` on is suspect, for `reason`."""

  step: int
  first_bad: int
  reason: str


def all_finite(tree: Any) -> jax.Array:
  """Whether every entry of every leaf is finite (pure: jit it)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def good_step(kept: list[int], first_bad: int) -> int | None:
  """The newest kept step whose next step's loss came before `first_bad`, or None."""
  return max((s for s in kept if s + 1 < first_bad), default=None)


class Guard:
  """The checks of one stage (config group `train`) and its rollbacks so far."""

  def __init__(self, train_cfg):
    self.policy = train_cfg.on_divergence
    self.factor = float(train_cfg.loss_spike_factor)
    self.max_rollbacks = int(train_cfg.max_rollbacks)
    self.reference: float | None = None  # the previous log window's mean loss
    self.rollbacks: list[dict[str, Any]] = []

  def check_step(self, step: int, loss: float, params_finite: bool = True) -> None:
    """Raises Diverged for a non-finite loss of `step` or non-finite parameters after it."""
    if not math.isfinite(loss):
      raise Diverged(step, step, f"loss is {loss} at step {step}")
    if not params_finite:
      raise Diverged(step, step + 1, f"parameters are not finite after step {step}")

  def check_window(self, done: int, mean_loss: float, steps: int) -> None:
    """Raises Diverged when the window of `steps` steps ending at `done` spikes."""
    ref, first = self.reference, done - steps + 1
    if self.factor and ref is not None and mean_loss > self.factor * ref:
      raise Diverged(done, first, f"loss spike: the mean loss {mean_loss:.4g} of steps "
                     f"{first}..{done} is above train.loss_spike_factor={self.factor:g} x "
                     f"{ref:.4g}, the previous window's")
    self.reference = mean_loss

  def why_stop(self, good: int | None) -> str:
    """'' when the run may roll back to `good`, else why it stops."""
    if self.policy == "stop":
      return "train.on_divergence='stop'"
    if good is None:
      return "train.on_divergence='rollback' has no good step to go back to"
    if len(self.rollbacks) >= self.max_rollbacks:
      return (f"train.on_divergence='rollback', and it rolled back {len(self.rollbacks)} times "
              f"already (train.max_rollbacks={self.max_rollbacks})")
    return ""

  def stop_message(self, d: Diverged, good: int | None, kept: list[int], moved: list[str],
                   why: str, workdir: str) -> str:
    """The DivergenceError message: what diverged, why the run stops, the good step."""
    head = f"{d.reason} (run {workdir}); stopping: {why}."
    if good is None and not kept:
      return f"{head} No checkpoint was saved before it; lower optimizer.lr"
    if good is None:
      return (f"{head} No kept checkpoint is good (kept: {kept}; a good one is a step s whose "
              f"next loss, step s + 1, came before step {d.first_bad}); more "
              "train.keep_checkpoints, or a lower optimizer.lr from the start")
    aside = f"; the steps after it were moved to {moved}" if moved else ""
    advice = ("set train.on_divergence='rollback' to skip the batches that diverged"
              if self.policy == "stop" else "raise train.max_rollbacks")
    return (f"{head} The newest good checkpoint is step {good} (the loss of step {good + 1} "
            f"was finite and came before step {d.first_bad}){aside}. A rerun resumes from step "
            f"{good}; lower optimizer.lr, or {advice}")

  def state_dict(self) -> dict[str, Any]:
    return {"reference": self.reference, "rollbacks": list(self.rollbacks)}

  def load_state_dict(self, state: dict[str, Any] | None) -> None:
    state = state or {}
    ref = state.get("reference")
    self.reference = None if ref is None else float(ref)
    self.rollbacks = list(state.get("rollbacks") or [])
