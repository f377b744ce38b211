"""A controller across a stage: `Controller` holds the config and the state.

The pure functions of controllers.py compute the weights; `Controller` keeps
their state across a stage's log windows, sets the weights on the pipeline,
checkpoints and restores the state, and times itself (controller overhead).
`controller_overhead_seconds` measures one update on synthetic domains.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Mapping, Sequence

from absl import logging
import ml_collections
import numpy as np

from cpt_jax.mixing.controllers import STATE_VERSION
from cpt_jax.mixing.controllers import accumulate
from cpt_jax.mixing.controllers import init_state
from cpt_jax.mixing.controllers import update
from cpt_jax.mixing.controllers import window_loss


class Controller:
  """Holds config and state; call `maybe_update` from the trainer's on_metrics.

      ctl = Controller(config.mixing, pipeline.domains, pipeline.roles, pipeline.weights)
      if resuming: ctl.load_state_dict(host["mixing"])
      ctl.set_reference(teacher_loss)        # kept once set (checkpointed)
      ctl.start(pipeline)                    # weights for the first batch
      on_metrics = lambda step, record, p: ctl.maybe_update(step, record, p)
      host["mixing"] = ctl.state_dict()      # in the checkpoint
  """

  def __init__(self, cfg: ml_collections.ConfigDict, domains: Sequence[str],
               roles: Sequence[str], initial_weights: Sequence[float] | np.ndarray):
    self.cfg = cfg
    self.state = init_state(cfg, domains, roles, initial_weights)
    self.seconds = 0.0  # wall time spent in maybe_update (controller overhead)

  @classmethod
  def for_pipeline(cls, cfg: ml_collections.ConfigDict, pipeline) -> "Controller":
    return cls(cfg, pipeline.domains, pipeline.roles, pipeline.weights)

  @property
  def weights(self) -> np.ndarray:
    return np.asarray(self.state["weights"], np.float64)

  def weights_dict(self) -> dict[str, float]:
    return dict(zip(self.state["domains"], self.state["weights"]))

  def set_reference(self, reference_loss: Mapping[str, float] | None) -> None:
    """Stores the teacher's per-domain loss, unless the (restored) state has one."""
    if reference_loss is not None and self.state["reference"] is None:
      self.state["reference"] = {d: float(v) for d, v in reference_loss.items()
                                 if math.isfinite(float(v))}

  def start(self, pipeline) -> None:
    """Sets the controller's current weights on the pipeline (not for 'static')."""
    if self.cfg.controller != "static":
      pipeline.set_weights(self.weights)

  def maybe_update(self, step: int, record: Mapping[str, Any], pipeline=None,
                   reference_loss: Mapping[str, float] | None = None) -> dict[str, float] | None:
    """Accumulates the record's losses; at multiples of update_every updates the weights.

    Returns the new weights by domain (also set on `pipeline`), or None.
    """
    t0 = time.perf_counter()
    name = self.cfg.controller
    if name == "static":
      return None
    self.set_reference(reference_loss)
    if name != "schedule":
      self.state = accumulate(self.state, record.get("domain_loss") or {},
                              record.get("domain_tokens"))
    if step <= 0 or step % self.cfg.update_every:
      self.seconds += time.perf_counter() - t0
      return None
    losses = window_loss(self.state)
    self.state["window"] = {}
    self.state, w = update(self.cfg, self.state, step, losses, self.state["reference"])
    if pipeline is not None:
      pipeline.set_weights(w)
    self.seconds += time.perf_counter() - t0
    return self.weights_dict()

  def metrics(self) -> dict[str, float]:
    """Scalars worth logging beside the weights."""
    out = {"mixing/updates": float(self.state["updates"])}
    if "eps" in self.state:
      out["mixing/exp3_eps"] = float(self.state["eps"])
    if "excess" in self.state:
      out["mixing/excess_sum"] = float(sum(self.state["excess"]))
    return out

  def state_dict(self) -> dict:
    return copy.deepcopy(self.state)

  def load_state_dict(self, state: Mapping) -> None:
    """Restores a checkpointed state of the same controller and domains."""
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"mixing state version {state.get('version')} != {STATE_VERSION}")
    for key, mine in (("controller", self.cfg.controller), ("domains", self.state["domains"]),
                      ("roles", self.state["roles"])):
      if state[key] != mine:
        raise ValueError(f"mixing state {key} {state[key]!r} differs from the run's {mine!r}")
    if state.get("config") != self.state["config"]:
      logging.warning("mixing config differs from the checkpoint's; the weight trajectory "
                      "will not match the original run")
    self.state = copy.deepcopy(dict(state))


def controller_overhead_seconds(cfg: ml_collections.ConfigDict, num_domains: int = 200,
                                iters: int = 50, seed: int = 0) -> float:
  """Mean wall seconds of one controller update (maybe_update) over `num_domains` domains.

  Domains: a quarter new, the rest alternating replay/distill, with synthetic
  losses drifting above a reference; the schedule controller gets a two-stage
  schedule over all domains. Excludes pipeline.set_weights.
  """
  cfg = copy.deepcopy(cfg)
  domains = [f"d{i:04d}" for i in range(num_domains)]
  n_new = max(1, num_domains // 4)
  roles = ["new"] * n_new + [("replay", "distill")[i % 2] for i in range(num_domains - n_new)]
  cfg.floor = min(float(cfg.floor), 0.1 / num_domains)
  cfg.update_every = 1
  if cfg.controller == "schedule":
    cfg.schedule = f"0:*=1;{max(1, iters // 2)}:{domains[0]}=1,*=0.5"
  rng = np.random.default_rng(seed)
  ref = {d: 2.0 + rng.random() for d in domains}
  ctl = Controller(cfg, domains, roles, np.ones(num_domains))
  ctl.set_reference(ref)
  records = []
  for i in range(iters):
    loss = {d: ref[d] + 0.01 * i * rng.random() for d in domains}
    records.append({"domain_loss": loss, "domain_tokens": {d: 1000 for d in domains}})
  t0 = time.perf_counter()
  for i, rec in enumerate(records):
    ctl.maybe_update(i + 1, rec)
  return (time.perf_counter() - t0) / iters
