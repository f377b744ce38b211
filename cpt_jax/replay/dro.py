"""Replay rows drawn by instance-reweighted DRO weights of M's loss (strategy `dro`).

Chen, Wang, Sow, Yang, Chen, Liang, Zhou and Wang (2024), "Take the Bull by the
Horns: Hard Sample-Reweighted Continual Training Improves LLM Generalization"
(arXiv 2402.14270): for continued training on the pre-training data, weight each
sample by the closed-form solution of a KL-regularised distributionally robust
objective (IR-DRO),

  max_w  sum_i w_i l_i - lambda KL(w || uniform)   =>   w_i = exp(l_i / lambda) / Z,

with l_i the sample's loss under the current model: moderately hard samples weigh
more, the uniform draw is the limit lambda -> inf, top-k loss the limit lambda -> 0.

A replay buffer replays each of its rows equally often, so the weights become a
draw: k rows without replacement with probability proportional to w_i, by the
Gumbel-top-k trick (the k largest l_i / lambda + G_i, G_i ~ Gumbel(0, 1) i.i.d.),
which streams through a top-k heap. l_i is M's mean token loss of the row (nats);
lambda is `replay.dro_temperature`. Cost: one forward per candidate (the planner
counts it like teacher_loss).
"""

from __future__ import annotations

import numpy as np


def weights(loss_N: np.ndarray, temperature: float) -> np.ndarray:
  """IR-DRO's closed-form weights exp(l / lambda) / Z [N] (sum 1)."""
  z = np.asarray(loss_N, np.float64) / float(temperature)
  w = np.exp(z - np.max(z))
  return w / w.sum()


def gumbel_keys(loss_N: np.ndarray, temperature: float,
                rng: np.random.Generator) -> np.ndarray:
  """Keys [N] whose top k is a draw of k rows without replacement with P ~ weights."""
  loss_N = np.asarray(loss_N, np.float64)
  return loss_N / float(temperature) + rng.gumbel(size=loss_N.shape)
