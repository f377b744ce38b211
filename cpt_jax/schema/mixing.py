"""The `config.mixing` group: which controller moves the mixture weights, and how.

Schedule format (controller 'schedule'), levanter-style staged mixtures:

    'STEP:NAME=W,NAME=W;STEP:NAME=W,...'
    e.g. '0:py_code=0.5,py_help=0.5;100:py_code=0.2,py_help=0.8'

Stages are separated by ';'. A stage starting at STEP sets the weights of the
batches from step STEP on (step = the index of the batch, i.e. the number of
optimizer steps already done). The first stage starts at 0, starts increase
strictly, and every start is a multiple of `update_every`, so the switch happens
exactly at the boundary. NAME is a domain or an fnmatch pattern ('py_*', '*');
the first item that matches a domain gives its weight, patterns never match eval
domains, and trainable domains no item matches get 0. Each stage's weights are
normalised to sum to 1.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Sequence

import ml_collections
from ml_collections import config_dict
import numpy as np

from cpt_jax.schema import data as data_config
from cpt_jax.schema import deprecated

CONTROLLERS = ("static", "schedule", "doremi", "exp3", "forgetting")
ADAPTIVE = ("doremi", "exp3", "forgetting")
EXP3_SCHEDULES = ("odm", "constant")
TRAINABLE_ROLES = ("new", "replay", "distill")
REPLAY_ROLES = ("replay", "distill")


def default_mixing_config() -> ml_collections.ConfigDict:
  """All `mixing.*` keys with defaults; 'static' keeps `data.weights` for the whole run."""
  return config_dict.create(
      controller="static",  # 'static', 'schedule', 'doremi', 'exp3' or 'forgetting'.
      update_every=100,  # Steps between updates; a multiple of train.log_every (the call site).
      schedule="",  # 'schedule': 'STEP:name=w,...;STEP:...' (see this module's docstring).
      floor=1e-4,  # Min weight of each controlled domain (adaptive controllers); x K <= 1.
      smoothing=1e-3,  # doremi: alpha <- (1 - c) alpha + c / K after each update (DoReMi's c).
      doremi_lr=1.0,  # doremi: step size eta of the exponentiated-gradient update.
      exp3_schedule="odm",  # exp3: 'odm' eps_t = min(1/K, sqrt(ln K/(K t))) at step t; 'constant'.
      exp3_eps=0.05,  # exp3: exploration rate for exp3_schedule='constant' (capped at 1/K).
      exp3_reward_decay=0.9,  # exp3: R <- a R + (1 - a) r, ODM's moving average (0: last only).
      # Hard constraints on every adaptive controller's weights (doremi, exp3, forgetting;
      # see cpt_jax/mixing/controllers.py). new_min_share 0 and max_old_share 1: unconstrained.
      new_min_share=0.5,  # Min total share of the role-new domains (T).
      max_old_share=0.5,  # Max total share of the replay + distill domains (the old ones).
      replay_budget=deprecated.UNSET,  # Deprecated (removed in the next release): use
      # max_old_share; validation moves it there. -1: not set.
      forgetting_gain=1.0,  # forgetting: share added per nat of a domain's loss over the teacher.
  )


def _err(key: str, msg: str, where: str = "mixing") -> ValueError:
  return ValueError(f"{where}.{key}: {msg}")


def _number(cfg, key: str, lo: float, hi: float, *, lo_open: bool = False,
            where: str = "mixing") -> float:
  v = cfg[key]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise _err(key, f"must be a finite number, got {v!r}", where)
  if v < lo or v > hi or (lo_open and v == lo):
    raise _err(key, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", where)
  return float(v)


def parse_schedule(spec: str) -> list[tuple[int, list[tuple[str, float]]]]:
  """'0:a=1,b=1;100:a=1' -> [(0, [('a', 1.0), ('b', 1.0)]), (100, [('a', 1.0)])]."""
  stages = []
  for part in (spec or "").split(";"):
    part = part.strip()
    if not part:
      continue
    if ":" not in part:
      raise _err("schedule", f"stage {part!r} is not STEP:name=w,...")
    head, body = part.split(":", 1)
    try:
      start = int(head.strip())
    except ValueError:
      raise _err("schedule", f"stage start {head.strip()!r} is not an integer step") from None
    where = f" at step {start}"
    items = data_config.parse_name_weights(body, lambda msg: _err("schedule", msg), where)
    for name, w in items:
      if not math.isfinite(w) or w < 0:
        raise _err("schedule", f"weight of {name!r}{where} must be finite and >= 0, got {w}")
    if not items:
      raise _err("schedule", f"the stage at step {start} has no weights")
    stages.append((start, items))
  if not stages:
    raise _err("schedule", "is empty; expected 'STEP:name=w,...;STEP:...'")
  if stages[0][0] != 0:
    raise _err("schedule", f"the first stage must start at step 0, not {stages[0][0]}")
  for (a, _), (b, _) in zip(stages, stages[1:]):
    if b <= a:
      raise _err("schedule", f"stage starts must increase strictly; {b} follows {a}")
  return stages


def resolve_schedule(spec: str, domains: Sequence[str],
                     roles: Sequence[str]) -> list[tuple[int, np.ndarray]]:
  """Each stage's start and normalised weight vector over `domains`."""
  out = []
  for start, items in parse_schedule(spec):
    w = np.zeros(len(domains), np.float64)
    used = [False] * len(items)
    for i, (d, r) in enumerate(zip(domains, roles)):
      for j, (k, v) in enumerate(items):
        if k == d or (r != "eval" and fnmatch.fnmatchcase(d, k)):
          used[j] = True
          if r == "eval":
            raise _err("schedule", f"domain {d!r} has role eval and cannot get a weight "
                       f"(stage at step {start})")
          w[i] = v
          break
    for (k, _), u in zip(items, used):
      if not u:
        raise _err("schedule", f"{k!r} (stage at step {start}) matches no trainable domain")
    if not w.sum() > 0:
      raise _err("schedule", f"the stage at step {start} gives every domain weight 0")
    out.append((start, w / w.sum()))
  return out


def upgrade_mixing_config(cfg: ml_collections.ConfigDict, where: str = "mixing") -> None:
  """Moves a set deprecated `replay_budget` into `max_old_share`, in place."""
  if cfg.get("replay_budget", deprecated.UNSET) == deprecated.UNSET:
    return
  value = _number(cfg, "replay_budget", 0.0, 1.0, where=where)
  deprecated.move(cfg, where, "replay_budget", "max_old_share",
                  {"max_old_share": default_mixing_config().max_old_share},
                  f"{where}.replay_budget is deprecated (removed in the next release): use "
                  f"{where}.max_old_share; read as {where}.max_old_share={value:g}")


def validate_mixing_config(cfg: ml_collections.ConfigDict, domains: Sequence[str] | None = None,
                           roles: Sequence[str] | None = None,
                           log_every: int | None = None) -> None:
  """Raises ValueError naming the key (`mixing.floor`, ...); after `upgrade_mixing_config`.

  Without domains/roles only field values are checked; with them, also what
  depends on the run's domains (schedule names, floor * #domains, the shares).
  With `log_every` (train.log_every), update_every must be a multiple of it.
  """
  upgrade_mixing_config(cfg)
  if cfg.controller not in CONTROLLERS:
    raise _err("controller", f"{cfg.controller!r} is not one of {CONTROLLERS}")
  ue = cfg.update_every
  if isinstance(ue, bool) or not isinstance(ue, int) or ue < 1:
    raise _err("update_every", f"must be an int >= 1, got {ue!r}")
  if log_every is not None and cfg.controller != "static" and ue % log_every:
    raise _err("update_every", f"{ue} is not a multiple of train.log_every={log_every}; the "
               "trainer only calls the controller on log steps")
  floor = _number(cfg, "floor", 0.0, 1.0)
  _number(cfg, "smoothing", 0.0, 1.0)
  _number(cfg, "doremi_lr", 0.0, math.inf)
  if cfg.exp3_schedule not in EXP3_SCHEDULES:
    raise _err("exp3_schedule", f"{cfg.exp3_schedule!r} is not one of {EXP3_SCHEDULES}")
  _number(cfg, "exp3_eps", 0.0, 1.0)
  decay = _number(cfg, "exp3_reward_decay", 0.0, 1.0)
  if decay == 1.0:
    raise _err("exp3_reward_decay", "must be < 1 (1 would never update the rewards)")
  new_min = _number(cfg, "new_min_share", 0.0, 1.0)
  max_old = _number(cfg, "max_old_share", 0.0, 1.0)
  _number(cfg, "forgetting_gain", 0.0, math.inf)
  if cfg.controller == "schedule":
    for start, _ in parse_schedule(cfg.schedule):
      if start % ue:
        raise _err("schedule", f"stage start {start} is not a multiple of mixing.update_every="
                   f"{ue}, so the switch could not happen exactly there")
  if domains is None or roles is None:
    return
  if len(domains) != len(roles):
    raise ValueError(f"{len(domains)} domains but {len(roles)} roles")
  if cfg.controller == "schedule":
    resolve_schedule(cfg.schedule, domains, roles)
  n_new = sum(r == "new" for r in roles)
  n_rep = sum(r in REPLAY_ROLES for r in roles)
  k = n_new + n_rep
  if cfg.controller in ADAPTIVE and floor * k > 1.0:
    raise _err("floor", f"{floor} x {k} trainable domains > 1; the weights could not sum to 1")
  if cfg.controller in ADAPTIVE:  # the max old share binds every adaptive controller
    if cfg.controller == "forgetting" and n_new == 0:
      raise _err("controller", "'forgetting' needs at least one domain with role new")
    if n_new == 0 and n_rep and min(max_old, 1.0 - new_min) < 1.0:
      raise _err("max_old_share", f"{max_old} (new_min_share={new_min}) needs a domain with "
                 "role new to take the rest; with only replay/distill domains set "
                 "max_old_share=1 and new_min_share=0")
    if n_rep and floor * n_rep > max_old:
      raise _err("max_old_share", f"{max_old} is below floor x {n_rep} replay/distill domains "
                 f"= {floor * n_rep}")
    if floor * n_rep + max(new_min, floor * n_new) > 1.0 + 1e-12:
      raise _err("new_min_share", f"{new_min} plus the replay floors ({floor} x {n_rep}) "
                 "exceeds 1")
