"""The features a run plugs into the loop, as hooks in the order their effects happen.

  replay selection   replay/hook.py      (config.replay; plan + select, online refresh)
  budget stop        train/hooks.py      (replay.max_tflops / max_seconds)
  rate controller    mixing/hook.py      (config.mixing)
  eval without tau   train/hooks.py      (decomposition.eval_without_tau, sigma / tau runs)
  metric writer      train/hooks.py
  user callback      train/hooks.py      (`on_metrics`)
  preemption         train/preemption.py (SIGTERM: save at an agreed step, then stop)

`make_hooks` is the one place this order is written; `cpt_jax.run.train` passes it
to the trainer. A new feature is a Hook built here from its config group and the
narrow objects in `Env` (see ARCHITECTURE.md).
"""

from __future__ import annotations

from cpt_jax.mixing import hook as mixing_hook
from cpt_jax.replay import hook as replay_hook
from cpt_jax.schema import train as train_schema
from cpt_jax.train import hooks as hooks_lib
from cpt_jax.train import preemption


def make_hooks(env: hooks_lib.Env) -> list[hooks_lib.Hook]:
  """The run's hooks, in the order their effects must happen (module docstring)."""
  out: list[hooks_lib.Hook] = []
  replay = replay_hook.replay_hook(env)
  if replay is not None:
    out.append(replay)  # first: the controller starts from the planned replay share
  out.append(hooks_lib.BudgetStop(env.budget, env.usage))
  out.append(mixing_hook.controller_hook(env))
  layout, dc = env.ctx.layout, env.config.decomposition
  if layout.has_delta and dc.eval_without_tau:
    out.append(hooks_lib.EvalWithoutTau(env.evaluate, layout))
  out.append(hooks_lib.MetricsWriter(env.writer))  # after the controller: its weights logged
  profile = train_schema.parse_profile_steps(env.config.train.profile_steps)
  if profile is not None:
    out.append(hooks_lib.Profile(profile, env.workdir))
  if not env.config.train.progress_bar:  # resolved: False unless stderr is a terminal
    out.append(hooks_lib.ProgressLog(env.config.train.steps))
  if env.on_metrics is not None:
    out.append(hooks_lib.Callback(env.on_metrics, env.pipeline))
  out.append(preemption.Preemption(env.workdir))  # asked after every step, apart from the rest
  return out
