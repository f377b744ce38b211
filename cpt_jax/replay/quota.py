"""Per-domain replay buffer quotas from each domain's measured forgetting.

At an online refresh (manager.OnlineBuffer) every buffer row's interference,
its loss under the current model minus its loss under M, is already scored;
a domain's mean over its buffer rows is its measured forgetting f_d, at no
extra FLOPs (OnlineBuffer averages it with the previous refresh's estimate). With pool sizes n_d and strength a (`replay.online_quota`), the
target share of domain d is

  (1 - a) n_d / sum n + a n_d max(f_d, 0) / sum_e n_e max(f_e, 0)

(the size-proportional share when no domain forgets). The buffer's k rows are
split by these shares (largest remainder), each domain keeping at least one
row (so its forgetting stays measured) and at most `cap` rows.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def allocate(k: int, sizes: Mapping[str, int], forgetting: Mapping[str, float],
             strength: float, cap: Mapping[str, int] | None = None) -> dict[str, int]:
  """Buffer rows per domain (sum k while the caps allow); see the module docstring."""
  names = sorted(sizes)
  n = np.array([float(sizes[d]) for d in names])
  f = np.array([max(float(forgetting.get(d, 0.0)), 0.0) for d in names])
  share = n / n.sum()
  weighted = n * f
  if weighted.sum() > 0:
    share = (1.0 - strength) * share + strength * weighted / weighted.sum()
  hi = np.array([min(int(sizes[d]), int((cap or sizes)[d])) for d in names], np.int64)
  q = np.minimum(np.maximum(np.floor(k * share).astype(np.int64), 1), hi)
  rem = k * share - np.floor(k * share)
  for i in np.argsort(-rem, kind="stable"):  # one more row by largest remainder
    if q.sum() < k and q[i] < hi[i]:
      q[i] += 1
  for i in np.argsort(-share, kind="stable"):  # what caps left over, by share
    while q.sum() < k and q[i] < hi[i]:
      q[i] += 1
  while q.sum() > k:  # the one-row floors overshot: take from the largest
    i = int(np.argmax(np.where(q > 1, q, -1)))
    q[i] -= 1
  return {d: int(x) for d, x in zip(names, q)}
