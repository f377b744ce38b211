"""Online mixture-weight controllers: pure functions of (config, state, losses).

Every `mixing.update_every` steps a controller turns the per-domain training
loss of the last window (and the reference: the stage's starting model's loss per
domain on that domain's training rows, measured once at the stage start) into new
mixture weights for the data pipeline:

  static      the configured `data.weights`, never changed.
  schedule    piecewise-constant stages (levanter's staged mixtures); see
              cpt_jax/schema/mixing.py for the format.
  doremi      exponentiated gradient on excess loss (Xie et al. 2023, DoReMi):
                e_i   = max(0, loss_i - ref_i)
                alpha = softmax(log alpha + doremi_lr * e)
                alpha = (1 - smoothing) * alpha + smoothing / K
                w     = floor + (1 - K floor) * alpha, then the max old share
              DoReMi clips the per-token excess; only per-domain means exist
              here, so the mean excess is clipped. alpha starts at the
              configured weights (DoReMi starts uniform).
  exp3        Online Data Mixing (Albalak et al. 2023), loss as reward. As in
              ODM, round t is a training step (batch index s is round s + 1).
              The update at step s sees the window trained with the emitted
              weights w (capped, constraints.py):
                r_i   = loss_i                       (the window's mean loss)
                R_i   = a R_i + (1 - a) r_i          (a = exp3_reward_decay)
                pi    = (1 - K eps_s+1) softmax(eps_s R) + eps_s+1
                w     = floor + (1 - K floor) pi, then the max old share
              with eps_t = min(1/K, sqrt(ln K / (K t))) ('odm', ODM's schedule)
              or min(1/K, exp3_eps) ('constant'); state['eps'] is the rate in
              force. The first window uses the configured weights (ODM starts
              uniform); R starts at 0. Unlike ODM, every domain seen in the
              window (not one sampled arm) updates its reward, so the reward
              is the observed loss itself: ODM's importance weight 1 / w_i
              corrects for observing only the sampled arm and would inflate a
              1% replay domain's reward 100x here.
  forgetting  replay/distill domains (set R) gain weight in proportion to their
              loss increase over the teacher. With b = configured weights
              normalised over the controlled domains, f = floor,
              e_i = max(0, loss_i - ref_i):
                d_i  = max(f, b_i + forgetting_gain * e_i)          i in R
                d    = R weights within the max old share (constraints.py)
                w_j  = f + (1 - sum(d) - |N| f) b_j / sum(b_N)      j in N
              (uniform over N if sum(b_N) = 0). The initial weights already
              follow this rule with e = 0.

Every adaptive controller keeps the new domains (set N, data T) at
`new_min_share` or more and the replay + distill domains (set R, the old ones)
at `max_old_share` or less: the floor and that projection are
cpt_jax/mixing/constraints.py.

Controlled domains are those with role new/replay/distill and a configured
weight > 0; the others (eval domains always) keep weight 0. Losses that are
missing from a window or not finite leave that domain's signal (excess,
reward) as it was; domains missing from the reference get excess 0.

The state is a JSON-serialisable dict; all math is numpy float64 in a fixed
order, and Python floats survive `json.dumps`/`json.loads` exactly, so a run
resumed from a checkpointed state continues the same weight trajectory bit for
bit. `Controller` (wrapper.py) wraps the functions for the trainer's
`on_metrics` hook.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from cpt_jax.mixing.constraints import apply_floor
from cpt_jax.mixing.constraints import old_share_cap
from cpt_jax.mixing.constraints import scale_old
from cpt_jax.mixing.constraints import within_max_old_share
from cpt_jax.schema import mixing as config_lib

STATE_VERSION = 1


# -- helpers ----------------------------------------------------------------
def _vector(domains: Sequence[str], values: Mapping[str, float] | None) -> np.ndarray:
  """values by domain name -> float64 vector; NaN where missing or not finite."""
  out = np.full(len(domains), np.nan, np.float64)
  if values:
    for i, d in enumerate(domains):
      v = values.get(d)
      if v is not None and math.isfinite(float(v)):
        out[i] = float(v)
  return out


def _floats(x) -> list[float]:
  return [float(v) for v in np.asarray(x, np.float64)]


def _softmax(x_C: np.ndarray, mask_C: np.ndarray) -> np.ndarray:
  z = np.where(mask_C, x_C, -np.inf)
  e = np.exp(z - z[mask_C].max())
  return e / e.sum()


def exp3_exploration(cfg: ml_collections.ConfigDict, t: int, k: int) -> float:
  """Exploration rate eps_t (t = 1, 2, ...) for K = k arms; see the module doc."""
  if t < 1:
    raise ValueError(f"exp3 time step must be >= 1, got {t}")
  if k <= 1:
    return 0.0
  if cfg.exp3_schedule == "odm":
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))
  return min(1.0 / k, float(cfg.exp3_eps))


def _update_excess(state: dict, loss_C: np.ndarray, ref_C: np.ndarray) -> np.ndarray:
  """Excess max(0, loss - ref) where observed (0 without a reference); else the old one."""
  old = np.asarray(state["excess"], np.float64)
  seen = ~np.isnan(loss_C)
  exc = np.where(np.isnan(ref_C), 0.0, np.maximum(0.0, loss_C - np.nan_to_num(ref_C)))
  new = np.where(seen & np.asarray(state["controlled"]), exc, old)
  state["excess"] = _floats(new)
  return new


def _forgetting_weights(cfg, state: dict, excess_C: np.ndarray) -> np.ndarray:
  rep, new, cap = old_share_cap(cfg, state)
  base = np.asarray(state["base"], np.float64)
  f = float(cfg.floor)
  n_new = int(new.sum())
  w = np.zeros(len(base), np.float64)
  d = np.where(rep, np.maximum(f, base + float(cfg.forgetting_gain) * excess_C), 0.0)
  d = scale_old(d, rep, f, cap)
  w[rep] = d[rep]
  rest = 1.0 - d.sum() - n_new * f
  bn = np.where(new, base, 0.0)
  share = bn / bn.sum() if bn.sum() > 0 else new / max(n_new, 1)
  w[new] = f + rest * share[new]
  return w


# -- the pure API -------------------------------------------------------------
def init_state(cfg: ml_collections.ConfigDict, domains: Sequence[str], roles: Sequence[str],
               initial_weights: Sequence[float] | np.ndarray) -> dict:
  """The controller's state at the start of a stage (JSON-serialisable).

  `initial_weights` are the pipeline's configured weights (any positive scale).
  """
  domains, roles = list(domains), list(roles)
  config_lib.validate_mixing_config(cfg, domains, roles)
  w0 = np.asarray(initial_weights, np.float64)
  if w0.shape != (len(domains),) or not np.all(np.isfinite(w0)) or np.any(w0 < 0):
    raise ValueError(f"initial_weights must be {len(domains)} finite weights >= 0, got {w0}")
  mask = np.array([r in config_lib.TRAINABLE_ROLES for r in roles]) & (w0 > 0)
  if not mask.any():
    raise ValueError("no trainable domain has a positive initial weight")
  base = np.where(mask, w0, 0.0)
  base = base / base.sum()
  state: dict[str, Any] = {
      "version": STATE_VERSION, "controller": cfg.controller, "domains": domains,
      "roles": roles, "controlled": [bool(m) for m in mask], "base": _floats(base),
      "updates": 0, "step": 0, "reference": None, "window": {},
      "config": json.loads(cfg.to_json()),
  }
  name = cfg.controller
  if name == "static":
    w = base
  elif name == "schedule":
    w = schedule_weights(cfg, domains, roles, 0)
  elif name == "doremi":
    state["excess"] = [0.0] * len(domains)
    state["alpha"] = _floats(base)
    state["alpha_sum"] = [0.0] * len(domains)  # running sum of alpha (DoReMi's output average)
    w = within_max_old_share(apply_floor(base, mask, float(cfg.floor)), state, cfg)
  elif name == "exp3":
    state["reward"] = [0.0] * len(domains)
    state["eps"] = exp3_exploration(cfg, 1, int(mask.sum()))
    w = within_max_old_share(apply_floor(base, mask, float(cfg.floor)), state, cfg)
  elif name == "forgetting":
    state["excess"] = [0.0] * len(domains)
    w = _forgetting_weights(cfg, state, np.zeros(len(domains)))
  else:
    raise ValueError(f"mixing.controller: {name!r} is not one of {config_lib.CONTROLLERS}")
  state["weights"] = _floats(w)
  return state


def schedule_weights(cfg: ml_collections.ConfigDict, domains: Sequence[str],
                     roles: Sequence[str], step: int) -> np.ndarray:
  """The weights of the schedule stage in force for the batch at `step`."""
  stages = _stages(cfg.schedule, tuple(domains), tuple(roles))
  w = stages[0][1]
  for start, ws in stages:
    if start <= step:
      w = ws
  return np.array(w, np.float64)


@functools.lru_cache(maxsize=16)
def _stages(spec: str, domains: tuple[str, ...], roles: tuple[str, ...]):
  return tuple((s, tuple(w)) for s, w in config_lib.resolve_schedule(spec, domains, roles))


def update(cfg: ml_collections.ConfigDict, state: Mapping, step: int,
           domain_loss: Mapping[str, float],
           reference_loss: Mapping[str, float] | None = None) -> tuple[dict, np.ndarray]:
  """One controller update; returns (new state, weights for the batches from `step` on).

  Pure: `state` is not modified. `domain_loss` is the mean training CE per
  domain over the window since the last update; `reference_loss` the starting
  model's CE per domain on its training rows (`Trainer.reference_losses`).
  """
  state = dict(state)  # values are replaced, never mutated, so a shallow copy is pure
  if state.get("version") != STATE_VERSION:
    raise ValueError(f"mixing state version {state.get('version')} != {STATE_VERSION}")
  if state["controller"] != cfg.controller:
    raise ValueError(f"mixing state is for controller {state['controller']!r}, config says "
                     f"{cfg.controller!r}")
  domains = state["domains"]
  mask = np.asarray(state["controlled"])
  loss_C = _vector(domains, domain_loss)
  ref_C = _vector(domains, reference_loss)
  name = cfg.controller
  f = float(cfg.floor)
  if name == "static":
    w = np.asarray(state["weights"], np.float64)
  elif name == "schedule":
    w = schedule_weights(cfg, domains, state["roles"], step)
  elif name == "doremi":
    exc = _update_excess(state, loss_C, ref_C)
    alpha = np.asarray(state["alpha"], np.float64)
    with np.errstate(divide="ignore"):
      logit = np.log(alpha) + float(cfg.doremi_lr) * exc
    alpha = _softmax(logit, mask)
    c = float(cfg.smoothing)
    alpha = np.where(mask, (1.0 - c) * alpha + c / mask.sum(), 0.0)
    state["alpha"] = _floats(alpha)
    state["alpha_sum"] = _floats(np.asarray(state["alpha_sum"], np.float64) + alpha)
    w = within_max_old_share(apply_floor(alpha, mask, f), state, cfg)  # alpha stays uncapped
  elif name == "exp3":
    k = int(mask.sum())
    seen = mask & ~np.isnan(loss_C)
    r = np.nan_to_num(loss_C)  # every arm is observed: no importance weight
    a = float(cfg.exp3_reward_decay)
    reward = np.asarray(state["reward"], np.float64)
    reward = np.where(seen, a * reward + (1.0 - a) * r, reward)
    # ODM's round t is the training step: batch `step` (0-based) is round step + 1.
    eps_prev, eps = exp3_exploration(cfg, max(int(step), 1), k), exp3_exploration(cfg, step + 1, k)
    p = np.where(mask, (1.0 - k * eps) * _softmax(eps_prev * reward, mask) + eps, 0.0)
    state["reward"] = _floats(reward)
    state["eps"] = eps
    w = within_max_old_share(apply_floor(p, mask, f), state, cfg)  # the reward stays uncapped
  elif name == "forgetting":
    exc = _update_excess(state, loss_C, ref_C)
    w = _forgetting_weights(cfg, state, exc)
  else:
    raise ValueError(f"mixing.controller: {name!r} is not one of {config_lib.CONTROLLERS}")
  state["weights"] = _floats(w)
  state["updates"] = int(state["updates"]) + 1
  state["step"] = int(step)
  return state, np.asarray(state["weights"], np.float64)


def accumulate(state: Mapping, domain_loss: Mapping[str, float],
               domain_tokens: Mapping[str, int] | None = None) -> dict:
  """Adds one log window's per-domain loss (token-weighted) to the update window."""
  state = dict(state)
  win = state["window"] = dict(state["window"])
  for d, v in (domain_loss or {}).items():
    v = float(v)
    if not math.isfinite(v):
      continue
    n = float((domain_tokens or {}).get(d, 1))
    if n <= 0:
      continue
    ce, tok = win.get(d, (0.0, 0.0))
    win[d] = [ce + v * n, tok + n]
  return state


def window_loss(state: Mapping) -> dict[str, float]:
  """Mean loss per domain over the accumulated window."""
  return {d: ce / tok for d, (ce, tok) in state["window"].items() if tok > 0}
