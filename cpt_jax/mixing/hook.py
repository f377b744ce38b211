"""The rate controller as a loop hook: mixture weights from each log window's losses.

Built by `controller_hook(env)` from `config.mixing`, the pipeline and a
reference-loss function (the stage's starting model's per-domain CE, which
'doremi' and 'forgetting' compare the running loss against).
"""

from __future__ import annotations

from cpt_jax.mixing import wrapper
from cpt_jax.train import hooks as hooks_lib


class RateController(hooks_lib.Hook):
  """At start: the controller for the pipeline's weights as they are then (after replay
  planning) or as checkpointed; on each log record: update the weights."""

  name = "mixing"

  def __init__(self, cfg, pipeline, reference_losses, model_params):
    self.cfg, self.pipeline = cfg, pipeline
    self.reference_losses, self.model_params = reference_losses, model_params
    self.controller: wrapper.Controller | None = None

  def start(self, state, saved):
    self.controller = wrapper.Controller.for_pipeline(self.cfg, self.pipeline)
    if saved is not None:
      self.controller.load_state_dict(saved)
    elif self.cfg.controller in ("doremi", "forgetting"):
      self.controller.set_reference(self.reference_losses(self.model_params(state.params)))
    self.controller.start(self.pipeline)

  def on_log(self, done, record):
    self.controller.maybe_update(done, record, self.pipeline)
    record.update(self.controller.metrics())
    record["controller_seconds"] = self.controller.seconds

  def state_dict(self):
    return self.controller.state_dict()


def controller_hook(env: hooks_lib.Env) -> RateController:
  return RateController(env.config.mixing, env.pipeline, env.reference_losses,
                        env.model_params)
