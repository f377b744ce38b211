"""A stage's hard compute budget, held while it trains.

`replay.max_tflops` and `replay.max_seconds` cap a whole stage: selection
scoring, replay, teacher forwards and T. Before training, the replay planner
sizes the stage to fit (cpt_jax/replay/planner.py); this guard holds the cap
during training. At every log boundary (the step metrics are fetched there
anyway, so the check adds no device sync) the stage ends when what it has
used, plus the next log window at the pace of the last one, plus the one-off
work already scheduled inside that window (online replay refreshes,
`Usage.lookahead`), would pass a cap. The pace leaves one-off work
(`Usage.fixed_*`) out, so a refresh in the last window is not taken for pace.
The stopped stage evaluates, checkpoints and reports like a finished one
(`summary["budget"]["stopped_at"]`), and a re-run of it trains no further
unless the caps changed.

Seconds are the stage's wall clock (selection, compilation, evaluation and
checkpoints included) summed over restarts; TFLOPs are the train step's model
FLOPs plus teacher forwards, every forward the replay scorer ran (selection,
online refreshes, the padding of partial batches, the rate measurement), the
EWC Fisher pass and the mixing controllers' reference forwards. The closing
evaluation and checkpoint after a stop are outside the cap.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

# n -> (TFLOPs, seconds) of the one-off work scheduled in the next n steps.
Lookahead = Callable[[int], tuple[float, float]]


@dataclasses.dataclass
class Usage:
  """What the stage has used by `step` (whole stage, all invocations).

  fixed_tflops / fixed_seconds: the one-off part of tflops / seconds (selection
  and refresh scoring, Fisher pass, reference forwards), left out of the pace;
  lookahead: the one-off work already scheduled after `step`; parts: tflops by
  component, for the summary.
  """
  step: int
  seconds: float
  tflops: float
  fixed_tflops: float = 0.0
  fixed_seconds: float = 0.0
  lookahead: Lookahead | None = None
  parts: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageBudget:
  """Caps (0 = none) and the host state that survives restarts."""
  max_tflops: float = 0.0
  max_seconds: float = 0.0
  seconds_before: float = 0.0  # wall clock of earlier invocations of this stage
  stopped_at: int | None = None  # the step a cap ended the stage at
  reason: str = ""
  # One-off TFLOPs counted by the trainer outside the train step and the
  # replay scorer (e.g. 'reference': controller reference forwards), summed
  # over restarts (host state in the checkpoint).
  counted: dict[str, float] = dataclasses.field(default_factory=dict)
  _last: Usage | None = None  # the previous check, for the pace

  @property
  def active(self) -> bool:
    return self.max_tflops > 0 or self.max_seconds > 0

  def start_window(self, usage: Usage) -> None:
    """Marks where the pace is measured from (the loop's first step)."""
    self._last = usage

  def count(self, name: str, tflops: float) -> None:
    """Adds one-off TFLOPs under `name` (see `counted`)."""
    self.counted[name] = self.counted.get(name, 0.0) + float(tflops)

  def check(self, usage: Usage, next_steps: int) -> str:
    """'' to go on, else why the stage stops before the next `next_steps` steps.

    Needed: the last window's per-step pace without its one-off work, times
    next_steps, plus the one-off work scheduled in those steps.
    """
    last, self._last = self._last, usage
    if not self.active or next_steps <= 0 or last is None or usage.step <= last.step:
      return ""
    n = usage.step - last.step
    per_step_s = ((usage.seconds - usage.fixed_seconds) - (last.seconds - last.fixed_seconds)) / n
    per_step_tf = ((usage.tflops - usage.fixed_tflops) - (last.tflops - last.fixed_tflops)) / n
    ahead_tf, ahead_s = usage.lookahead(next_steps) if usage.lookahead else (0.0, 0.0)
    need_s = max(per_step_s, 0.0) * next_steps + ahead_s
    need_tf = max(per_step_tf, 0.0) * next_steps + ahead_tf
    if self.max_seconds and usage.seconds + need_s > self.max_seconds:
      return (f"replay.max_seconds={self.max_seconds:g}: {usage.seconds:.1f} s used by step "
              f"{usage.step}, the next {next_steps} steps need ~{need_s:.1f} s more")
    if self.max_tflops and usage.tflops + need_tf > self.max_tflops * (1 + 1e-9):
      return (f"replay.max_tflops={self.max_tflops:g}: {usage.tflops:.4g} TFLOPs used by step "
              f"{usage.step}, the next {next_steps} steps need ~{need_tf:.4g} more")
    return ""

  def check_first_window(self, usage: Usage, window_steps: int, step_tflops: float) -> None:
    """ValueError, before the first step, when `replay.max_tflops` cannot hold what the stage
    has used (one-off work such as replay selection) plus its first log window of
    `window_steps` train steps at `step_tflops` each (a lower bound: teacher forwards come on
    top). The stop is decided at log boundaries, so such a cap could only end the stage
    after a window past it, with or without a replay strategy."""
    need = usage.tflops + window_steps * step_tflops
    if self.max_tflops and need > self.max_tflops * (1 + 1e-9):
      used = f"{usage.tflops:.4g} TFLOPs used before the first step + " if usage.tflops else ""
      raise ValueError(
          f"replay.max_tflops={self.max_tflops:g} is below what the stage's first log window "
          f"costs: {used}{window_steps} train steps (train.log_every) x {step_tflops:.4g} "
          f"TFLOPs = {need:.4g} TFLOPs; raise replay.max_tflops or lower train.log_every")

  def stop(self, step: int, reason: str) -> None:
    self.stopped_at, self.reason = int(step), reason

  def state_dict(self, seconds_used: float) -> dict[str, Any]:
    return {"seconds": float(seconds_used), "stopped_at": self.stopped_at, "reason": self.reason,
            "max_tflops": self.max_tflops, "max_seconds": self.max_seconds,
            "counted": dict(self.counted)}

  def load_state_dict(self, state: dict[str, Any] | None) -> None:
    state = state or {}
    self.seconds_before = float(state.get("seconds", 0.0))
    for name, tflops in (state.get("counted") or {}).items():  # earlier invocations' counts
      self.count(name, tflops)
    stopped = state.get("stopped_at")
    caps = (float(state.get("max_tflops", 0.0)), float(state.get("max_seconds", 0.0)))
    if caps != (self.max_tflops, self.max_seconds):  # other caps: they decide afresh
      stopped = None
    self.stopped_at = None if stopped is None else int(stopped)
    self.reason = str(state.get("reason", "")) if stopped is not None else ""

  def summary(self, usage: Usage) -> dict[str, Any]:
    return {"max_tflops": self.max_tflops, "max_seconds": self.max_seconds,
            "seconds_used": usage.seconds, "tflops_used": usage.tflops,
            "tflops_by_part": dict(usage.parts),
            "stopped_at": self.stopped_at, "reason": self.reason}
