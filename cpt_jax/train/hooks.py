"""What the training loop calls besides the step: one small interface, run in list order.

The loop (train/trainer.py `Trainer.run`) calls, for every hook in its list:

  after_step(done, state)         right after step `done` is dispatched (replay refresh)
  should_stop(done, next_steps)   at a log boundary: '' to go on, else why the stage ends
  on_log(done, record)            with the log record of the window ending at `done`;
                                  may add entries (controller metrics) or write it
  state_dict()                    host state saved in every checkpoint under `name` (the
                                  component reads it back when the trainer resumes)
  summary(summary)                an entry of the run summary under `summary_key`

The order of the list is the order of effects, written once in `Trainer.make_hooks`:
replay refresh, budget stop, rate controller, metric writer, user callback (a
controller's new weights are in the record the writer writes; the callback sees
what was written). Hooks hold the narrow objects they act on, never the trainer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np


class Hook:
  """The interface; every method is optional."""

  name = ""  # key of the hook's host state in checkpoints ('' = none)
  summary_key = ""  # key of its entry in the run summary ('' = none)

  def after_step(self, done: int, state: Any) -> None:
    pass

  def should_stop(self, done: int, next_steps: int) -> str:
    return ""

  def on_log(self, done: int, record: dict[str, Any]) -> None:
    pass

  def state_dict(self) -> dict[str, Any] | None:
    return None

  def summary(self, summary: dict[str, Any]) -> dict[str, Any] | None:
    return None


class ReplayRefresh(Hook):
  """Online replay: re-scores and swaps buffer rows every `replay.online_every` steps."""

  name, summary_key = "replay", "selection"

  def __init__(self, manager):
    self.manager = manager  # replay/manager.py ReplayManager (already started)

  def after_step(self, done, state):
    self.manager.maybe_refresh(done, state)

  def state_dict(self):
    return self.manager.state_dict()

  def summary(self, summary):
    return self.manager.summary(summary)


class BudgetStop(Hook):
  """The stage's hard caps (train/budget.py): stop before the next window would pass one."""

  name, summary_key = "budget", "budget"

  def __init__(self, budget, usage_fn: Callable[[int], Any]):
    self.budget, self.usage_fn = budget, usage_fn
    self.step = 0  # the last step seen, for the state's seconds

  def after_step(self, done, state):
    self.step = done

  def should_stop(self, done, next_steps):
    if not self.budget.active:
      return ""
    reason = self.budget.check(self.usage_fn(done), next_steps)
    if jax.process_count() > 1:  # process 0's clock decides for all
      stop = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(reason))))
      reason = (reason or "process 0's clock passed the cap") if stop else ""
    if reason:
      self.budget.stop(done, reason)
    return reason

  def state_dict(self):  # seconds and one-off FLOPs so far: a later cap counts them too
    return self.budget.state_dict(self.usage_fn(self.step).seconds)

  def summary(self, summary):
    return self.budget.summary(self.usage_fn(summary["step"])) if self.budget.active else None


class RateController(Hook):
  """Mixture weights from the window's per-domain losses (mixing/controllers.py)."""

  name = "mixing"

  def __init__(self, controller, pipeline):
    self.controller, self.pipeline = controller, pipeline

  def on_log(self, done, record):
    self.controller.maybe_update(done, record, self.pipeline)
    record.update(self.controller.metrics())
    record["controller_seconds"] = self.controller.seconds

  def state_dict(self):
    return self.controller.state_dict()



class MetricsWriter(Hook):
  """Writes each log record (metrics.jsonl, TensorBoard) through `writer`."""

  def __init__(self, writer):
    self.writer = writer

  def on_log(self, done, record):
    self.writer.write(done, record)


class Callback(Hook):
  """A user function on_metrics(step, record, pipeline) after each record is written."""

  def __init__(self, fn: Callable, pipeline):
    self.fn, self.pipeline = fn, pipeline

  def on_log(self, done, record):
    self.fn(done, record, self.pipeline)


def host_state(hooks: list[Hook]) -> dict[str, Any]:
  """{hook name: its state} for the checkpoint's host state."""
  out = {}
  for h in hooks:
    state = h.state_dict() if h.name else None
    if state is not None:
      out[h.name] = state
  return out
