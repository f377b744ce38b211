"""Replay selection as a loop hook: plan + select at the start, online refresh, its cost.

Built by `replay_hook(env)` from `config.replay` and the narrow objects of the run
(train/hooks.py `Env`): the pipeline, the run context, the workdir, a model-params
function and the stage's start-params function. None when `replay.strategy` is ''.
"""

from __future__ import annotations

from cpt_jax.replay import manager as manager_lib
from cpt_jax.train import hooks as hooks_lib


class ReplayRefresh(hooks_lib.Hook):
  """Fresh start: plan, select, write; resume: reuse. Online: re-score and swap buffer
  rows every `replay.online_every` steps; steered: the same from the log records' replay
  losses (no forward). `replay.ramp`: the replay share set every `ramp_every` steps."""

  name, summary_key = "replay", "selection"

  def __init__(self, manager: manager_lib.ReplayManager):
    self.manager = manager

  def start(self, state, saved):
    self.manager.start(state, saved)

  def after_step(self, done, state):
    self.manager.maybe_refresh(done, state)

  def on_log(self, done, record):
    self.manager.observe(record)

  def cost(self, step):
    m = self.manager
    return hooks_lib.Cost(tflops={"selection": m.scorer.run_flops / 1e12}, seconds=m.seconds,
                          lookahead=lambda n: m.pending(step, n))

  def state_dict(self):
    return self.manager.state_dict()

  def summary(self, summary, state):
    return self.manager.summary(summary)


def replay_hook(env: hooks_lib.Env) -> ReplayRefresh | None:
  """The replay hook `env.config.replay` asks for, or None."""
  if not env.config.replay.strategy:
    return None
  return ReplayRefresh(manager_lib.ReplayManager(
      env.config, env.pipeline, env.ctx, env.workdir, env.model_params, env.start_params))
