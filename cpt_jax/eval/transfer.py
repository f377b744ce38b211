"""Transfer metrics from a loss matrix L[stage][domain] (lower loss is better).

Stage 0 is the base model M (the model continued pre-training starts from).
`learned[i]` lists the domains stage i trains on (for stage 0: what M was
pretrained on). Signs follow the accuracy-based definitions, with loss
differences oriented so that the usual reading holds:

  bwt  (Lopez-Paz & Ranzato 2017)  mean over i < T, d in learned[i] of
        L[i][d] - L[T][d]; negative = forgetting (loss went up since).
  fwt  mean over i >= 1, d in learned[i] of L[0][d] - L[i-1][d]: how much the
        stages before i lowered d's loss versus the base model, before d is
        trained on; positive = helpful transfer.
  forgetting[d] (Chaudhry et al. 2018)  L[T][d] - min over i < T of L[i][d],
        for domains learned before T; positive = forgotten.
  average_loss  mean over all domains of L[T][d].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def transfer_metrics(loss_SxD: np.ndarray, domains: Sequence[str],
                     learned: Sequence[Sequence[str]]) -> dict:
  """BWT, FWT, per-domain forgetting and average loss of a stage sequence."""
  loss_SxD = np.asarray(loss_SxD, np.float64)
  num_stages = loss_SxD.shape[0]
  if len(learned) != num_stages:
    raise ValueError(f"learned has {len(learned)} entries for {num_stages} stages")
  col = {d: j for j, d in enumerate(domains)}
  for i, names in enumerate(learned):
    missing = [d for d in names if d not in col]
    if missing:
      raise ValueError(f"stage {i} learns {missing}, which have no column in the loss matrix")
  last = num_stages - 1

  bwt_terms = [loss_SxD[i, col[d]] - loss_SxD[last, col[d]]
               for i in range(last) for d in learned[i]]
  fwt_terms = [loss_SxD[0, col[d]] - loss_SxD[i - 1, col[d]]
               for i in range(1, num_stages) for d in learned[i]]
  seen = sorted({d for i in range(last) for d in learned[i]}, key=col.get)
  forgetting = {d: float(loss_SxD[last, col[d]] - loss_SxD[:last, col[d]].min()) for d in seen}
  return {
      "bwt": float(np.mean(bwt_terms)) if bwt_terms else 0.0,
      "fwt": float(np.mean(fwt_terms)) if fwt_terms else 0.0,
      "forgetting": forgetting,
      "mean_forgetting": float(np.mean(list(forgetting.values()))) if forgetting else 0.0,
      "average_loss": float(loss_SxD[last].mean()),
  }
