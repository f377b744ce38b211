"""What the training loop calls besides the step: one small interface, run in list order.

The loop (train/trainer.py `Trainer.run`) calls, for every hook in its list:

  start(state, saved)             once the state exists, before the first step; `saved`
                                  is the hook's host state from the checkpoint when the
                                  run resumes, else None (then the loop restores the
                                  data position)
  after_step(done, state)         right after step `done` is dispatched (replay refresh)
  should_stop(done, next_steps)   at a log boundary: '' to go on, else why the stage ends
  preempted(done)                 after each step: True to save at `done` and stop the
                                  invocation (train/preemption.py; the same answer on
                                  every process)
  on_log(done, record)            with the log record of the window ending at `done`;
                                  may add entries (controller metrics) or write it
  cost(step)                      a `Cost`: TFLOPs / seconds the hook spent for the stage
                                  budget (train/budget.py), or None
  state_dict()                    host state saved in every checkpoint under `name`
  summary(summary, state)         an entry of the run summary under `summary_key`

The order of the list is the order of effects, written once in `cpt_jax/features.py`
(`make_hooks`): replay selection before the rate controller (the controller starts
from the planned replay share), the controller before the metric writer (its new
weights are in the record the writer writes), the writer before a user callback.
Hooks are built from their config group and the narrow objects in `Env`, never
from the trainer.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np

from cpt_jax import paths


@dataclasses.dataclass
class Cost:
  """What a hook spent (for the stage budget): TFLOPs by part, one-off seconds, and
  lookahead(n) -> (TFLOPs, seconds) of its work due in the next n steps."""

  tflops: dict[str, float]
  seconds: float = 0.0
  lookahead: Callable[[int], tuple[float, float]] | None = None


@dataclasses.dataclass
class Env:
  """The narrow objects a run offers its hooks (built by the loop before the first step).

  config: the run's config; pipeline: data/pipeline.py; ctx: the run context (mesh,
  model, layout, shardings); workdir; writer: the metric sink (metrics.py);
  budget: the stage's budget (budget.py); usage(step) -> budget.Usage;
  model_params(params) -> model-shaped params; start_params(state | None) -> the
  stage's starting model M (a fresh copy); reference_losses(model_params) -> per-domain
  CE on training rows (counted in the budget); evaluate(model_params) -> per-domain
  eval; on_metrics: the user's callback or None.
  """

  config: Any
  pipeline: Any
  ctx: Any
  workdir: str
  writer: Any
  budget: Any
  usage: Callable[[int], Any]
  model_params: Callable[[Any], Any]
  start_params: Callable[[Any], Any]
  reference_losses: Callable[[Any], dict[str, float]]
  evaluate: Callable[[Any], dict]
  on_metrics: Callable | None = None


class Hook:
  """The interface; every method is optional."""

  name = ""  # key of the hook's host state in checkpoints ('' = none)
  summary_key = ""  # key of its entry in the run summary ('' = none)

  def start(self, state: Any, saved: dict[str, Any] | None) -> None:
    pass

  def after_step(self, done: int, state: Any) -> None:
    pass

  def should_stop(self, done: int, next_steps: int) -> str:
    return ""

  def preempted(self, done: int) -> bool:
    return False

  def on_log(self, done: int, record: dict[str, Any]) -> None:
    pass

  def cost(self, step: int) -> Cost | None:
    return None

  def state_dict(self) -> dict[str, Any] | None:
    return None

  def summary(self, summary: dict[str, Any], state: Any) -> dict[str, Any] | None:
    return None


class BudgetStop(Hook):
  """The stage's hard caps (train/budget.py): stop before the next window would pass one."""

  name, summary_key = "budget", "budget"

  def __init__(self, budget, usage_fn: Callable[[int], Any]):
    self.budget, self.usage_fn = budget, usage_fn
    self.step = 0  # the last step seen, for the state's seconds

  def start(self, state, saved):
    self.step = int(jax.device_get(state.step))
    if saved is not None:  # earlier invocations' seconds, counts and stop
      self.budget.load_state_dict(saved)

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

  def summary(self, summary, state):
    return self.budget.summary(self.usage_fn(summary["step"])) if self.budget.active else None


class EvalWithoutTau(Hook):
  """Every domain evaluated with the model without this stage's delta (sigma alone)."""

  summary_key = "eval_without_tau"

  def __init__(self, evaluate: Callable, layout):
    self.evaluate, self.layout = evaluate, layout

  def summary(self, summary, state):
    return self.evaluate(self.layout.base(state.params))


class MetricsWriter(Hook):
  """Writes each log record (metrics.jsonl, TensorBoard) through `writer`."""

  def __init__(self, writer):
    self.writer = writer

  def on_log(self, done, record):
    self.writer.write(done, record)


class ProgressLog(Hook):
  """One line per log window on stderr (process 0) when the progress bar is off: pods'
  log files get `step 40/200 (20%) loss 2.3121 lr 2.9e-04 3,482 tok/s`, not redraws."""

  def __init__(self, total_steps: int, stream=None):
    self.total = int(total_steps)
    self.stream = stream

  def on_log(self, done, record):
    if jax.process_index() != 0:
      return
    stream = self.stream or sys.stderr
    stream.write(f"step {done}/{self.total} ({100 * done // max(self.total, 1)}%) "
                 f"loss {record.get('loss', float('nan')):.4f} "
                 f"lr {record.get('learning_rate', float('nan')):.1e} "
                 f"{record.get('tokens_per_sec', 0):,.0f} tok/s\n")
    stream.flush()


class Profile(Hook):
  """A jax.profiler trace of steps a+1..b (`train.profile_steps='a:b'`) in <workdir>/profile,
  for TensorBoard's profile plugin (a bucket workdir: traced locally, then uploaded)."""

  summary_key = "profile"

  def __init__(self, steps: tuple[int, int], workdir: str):
    self.first, self.last = steps
    self.dir = os.path.join(workdir, "profile")
    self._trace_dir = None  # a local folder while tracing (paths.staging_dir)
    self.active = False

  def start(self, state, saved):
    self._toggle(int(jax.device_get(state.step)), state)

  def after_step(self, done, state):
    self._toggle(done, state)

  def _toggle(self, done, state):
    if not self.active and self.first <= done < self.last:
      self._trace_dir = paths.staging_dir(self.dir, prefix="cpt_jax-profile-")
      jax.profiler.start_trace(self._trace_dir)
      self.active = True
    elif self.active and done >= self.last:
      jax.block_until_ready(state.params)
      self._stop()

  def _stop(self):
    jax.profiler.stop_trace()
    self.active = False
    paths.publish_dir(self._trace_dir, self.dir)

  def summary(self, summary, state):
    if self.active:  # the run ended inside the window
      self._stop()
    return {"profile_dir": self.dir}


class Callback(Hook):
  """A user function on_metrics(step, record, pipeline) after each record is written."""

  def __init__(self, fn: Callable, pipeline):
    self.fn, self.pipeline = fn, pipeline

  def on_log(self, done, record):
    self.fn(done, record, self.pipeline)


def loop_hooks(env: Env) -> list[Hook]:
  """The hooks every run has (no features): budget stop, metric writer, user callback."""
  out: list[Hook] = [BudgetStop(env.budget, env.usage), MetricsWriter(env.writer)]
  if env.on_metrics is not None:
    out.append(Callback(env.on_metrics, env.pipeline))
  return out


def host_state(hooks: list[Hook]) -> dict[str, Any]:
  """{hook name: its state} for the checkpoint's host state."""
  out = {}
  for h in hooks:
    state = h.state_dict() if h.name else None
    if state is not None:
      out[h.name] = state
  return out
