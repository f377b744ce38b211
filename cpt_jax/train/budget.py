"""A stage's hard compute budget, held while it trains.

`replay.max_tflops` and `replay.max_seconds` cap a whole stage: selection
scoring, replay, teacher forwards and T. Before training, the replay planner
sizes the stage to fit (cpt_jax/replay/planner.py); this guard holds the cap
during training. At every log boundary (the step metrics are fetched there
anyway, so the check adds no device sync) the stage ends when what it has
used, plus the next log window at the pace of the last one, would pass a cap.
The stopped stage evaluates, checkpoints and reports like a finished one
(`summary["budget"]["stopped_at"]`), and a re-run of it trains no further
unless the caps changed.

Seconds are the stage's wall clock (selection, compilation, evaluation and
checkpoints included) summed over restarts; TFLOPs are the train step's model
FLOPs plus teacher forwards and selection scoring. The closing evaluation and
checkpoint after a stop are outside the cap.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Usage:
  """What the stage has used by `step` (whole stage, all invocations)."""
  step: int
  seconds: float
  tflops: float


@dataclasses.dataclass
class StageBudget:
  """Caps (0 = none) and the host state that survives restarts."""
  max_tflops: float = 0.0
  max_seconds: float = 0.0
  seconds_before: float = 0.0  # wall clock of earlier invocations of this stage
  stopped_at: int | None = None  # the step a cap ended the stage at
  reason: str = ""
  _last: Usage | None = None  # the previous check, for the pace

  @property
  def active(self) -> bool:
    return self.max_tflops > 0 or self.max_seconds > 0

  def start_window(self, usage: Usage) -> None:
    """Marks where the pace is measured from (the loop's first step)."""
    self._last = usage

  def check(self, usage: Usage, next_steps: int) -> str:
    """'' to go on, else why the stage stops before the next `next_steps` steps."""
    last, self._last = self._last, usage
    if not self.active or next_steps <= 0 or last is None or usage.step <= last.step:
      return ""
    per_step_s = (usage.seconds - last.seconds) / (usage.step - last.step)
    per_step_tf = (usage.tflops - last.tflops) / (usage.step - last.step)
    need_s, need_tf = per_step_s * next_steps, per_step_tf * next_steps
    if self.max_seconds and usage.seconds + need_s > self.max_seconds:
      return (f"replay.max_seconds={self.max_seconds:g}: {usage.seconds:.1f} s used by step "
              f"{usage.step}, the next {next_steps} steps need ~{need_s:.1f} s more")
    if self.max_tflops and usage.tflops + need_tf > self.max_tflops * (1 + 1e-9):
      return (f"replay.max_tflops={self.max_tflops:g}: {usage.tflops:.4g} TFLOPs used by step "
              f"{usage.step}, the next {next_steps} steps need ~{need_tf:.4g} more")
    return ""

  def stop(self, step: int, reason: str) -> None:
    self.stopped_at, self.reason = int(step), reason

  def state_dict(self, seconds_used: float) -> dict[str, Any]:
    return {"seconds": float(seconds_used), "stopped_at": self.stopped_at, "reason": self.reason,
            "max_tflops": self.max_tflops, "max_seconds": self.max_seconds}

  def load_state_dict(self, state: dict[str, Any] | None) -> None:
    state = state or {}
    self.seconds_before = float(state.get("seconds", 0.0))
    stopped = state.get("stopped_at")
    caps = (float(state.get("max_tflops", 0.0)), float(state.get("max_seconds", 0.0)))
    if caps != (self.max_tflops, self.max_seconds):  # other caps: they decide afresh
      stopped = None
    self.stopped_at = None if stopped is None else int(stopped)
    self.reason = str(state.get("reason", "")) if stopped is not None else ""

  def summary(self, usage: Usage) -> dict[str, Any]:
    return {"max_tflops": self.max_tflops, "max_seconds": self.max_seconds,
            "seconds_used": usage.seconds, "tflops_used": usage.tflops,
            "stopped_at": self.stopped_at, "reason": self.reason}
