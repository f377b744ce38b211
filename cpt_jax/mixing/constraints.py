"""The weight constraints every adaptive controller's output obeys (controllers.py).

Floor: each controlled domain (role new/replay/distill, configured weight > 0)
keeps at least `mixing.floor` = f; a distribution p over the K controlled
domains becomes f + (1 - K f) p (`apply_floor`).

Max old share (every adaptive controller: doremi, exp3, forgetting): the new
domains (set N, data T) keep at least `new_min_share` of the mixture and the
replay + distill domains (set R, the old ones) at most `max_old_share`, a hard
constraint on the emitted weights (initial ones included). With
  cap = min(max_old_share, 1 - max(new_min_share, |N| f)),
if sum_R w > cap, R is scaled toward the floor,
  w_i = f + (w_i - f) (cap - |R| f) / (sum_R w - |R| f)        i in R,
and the freed mass goes to N in proportion to w_j - f (uniform if all are at
the floor); mass never moves from N to R. The algorithms' own state (doremi's
alpha, exp3's rewards) is not capped, so a capped exp3 arm can sit below
eps. Set new_min_share=0 and max_old_share=1 for the unconstrained algorithms.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from cpt_jax.schema import mixing as config_lib


def apply_floor(p_C: np.ndarray, mask_C: np.ndarray, floor: float) -> np.ndarray:
  """floor + (1 - K floor) p over the controlled domains; 0 elsewhere."""
  k = int(mask_C.sum())
  return np.where(mask_C, floor + (1.0 - k * floor) * p_C, 0.0)


def old_share_cap(cfg, state: Mapping) -> tuple[np.ndarray, np.ndarray, float]:
  """(R mask, N mask, cap) of the max old share over the controlled domains."""
  mask = np.asarray(state["controlled"])
  roles = np.asarray(state["roles"])
  rep = mask & np.isin(roles, config_lib.REPLAY_ROLES)
  new = mask & (roles == "new")
  cap = min(float(cfg.max_old_share),
            1.0 - max(float(cfg.new_min_share), int(new.sum()) * float(cfg.floor)))
  if cap < 1.0 and rep.any() and not new.any():
    raise ValueError(f"mixing.max_old_share: {cfg.controller!r} has no role-new domain with a "
                     f"weight > 0 to take the mass over max_old_share={cfg.max_old_share}, "
                     f"new_min_share={cfg.new_min_share}")
  return rep, new, cap


def scale_old(d: np.ndarray, rep: np.ndarray, f: float, cap: float) -> np.ndarray:
  """d with R scaled toward the floor f to sum to cap if it sums to more; others unchanged."""
  total = np.where(rep, d, 0.0).sum()
  if not total > cap:
    return d
  n_rep = int(rep.sum())
  return np.where(rep, f + (d - f) * ((cap - n_rep * f) / (total - n_rep * f)), d)


def within_max_old_share(w: np.ndarray, state: Mapping, cfg) -> np.ndarray:
  """w with replay + distill within the max old share; the freed mass goes to N (module doc)."""
  rep, new, cap = old_share_cap(cfg, state)
  f = float(cfg.floor)
  d = scale_old(w, rep, f, cap)
  if d is w:
    return w
  freed = np.where(rep, w, 0.0).sum() - np.where(rep, d, 0.0).sum()
  above = np.where(new, np.maximum(w - f, 0.0), 0.0)
  share = above / above.sum() if above.sum() > 0 else new / int(new.sum())
  return np.where(new, w + freed * share, d)
