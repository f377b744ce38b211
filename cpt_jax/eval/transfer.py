"""Transfer metrics from a loss matrix L[stage][domain] (lower loss is better).

Row i is the model after stage i of a track (stage 0: the track's first
stage, e.g. the pretrain of M). `learned[i]` lists the domains stage i trains
on (new, replay or distill); `new[i]` those it trains as new data (role 'new';
default: learned[i]). The stage that trains d is the first stage i >= 1 with d
in new[i] and d in no learned[j], j < i; the track's first stage has no earlier
row, so its domains (a pretrain's several) give no forward-transfer term, as
the first task gives none in GEM. Domains trained again later (replay, or new
once more) are old there: no term either. With the loss of a randomly
initialised model of the same shape on d, b_d (`baseline`), the metrics of
Lopez-Paz & Ranzato (GEM, 2017), in loss form:

  bwt  mean over i < T, d in learned[i] of L[i][d] - L[T][d]; negative =
        forgetting (loss went up since).
  fwt  mean over (i, d), d trained by stage i >= 1, of b_d - L[i-1][d]: how
        much lower d's loss is after the stages before i than at random init,
        before d is trained on; positive = the earlier stages helped. None
        without a baseline.
  forgetting[d] (Chaudhry et al. 2018)  L[T][d] - min over i < T of L[i][d],
        for domains learned before T; positive = forgotten.
  average_loss  mean over all domains of L[T][d].
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def transfer_metrics(loss_SxC: np.ndarray, domains: Sequence[str],
                     learned: Sequence[Sequence[str]], *,
                     new: Sequence[Sequence[str]] | None = None,
                     baseline: Mapping[str, float] | None = None) -> dict:
  """BWT, FWT, per-domain forgetting and average loss of a stage sequence.

  loss_SxC: [S, C], stages by domains; baseline: {domain: loss of a random-init model}.
  """
  loss_SxC = np.asarray(loss_SxC, np.float64)
  num_stages = loss_SxC.shape[0]
  new = learned if new is None else new
  if len(learned) != num_stages or len(new) != num_stages:
    raise ValueError(f"learned/new have {len(learned)}/{len(new)} entries for {num_stages} "
                     "stages")
  col = {d: j for j, d in enumerate(domains)}
  for i, names in enumerate(list(learned) + list(new)):
    missing = [d for d in names if d not in col]
    if missing:
      raise ValueError(f"stage {i % num_stages} learns {missing}, which have no column in the "
                       "loss matrix")
  last = num_stages - 1

  bwt_terms = [loss_SxC[i, col[d]] - loss_SxC[last, col[d]]
               for i in range(last) for d in learned[i]]
  trained_by = [(i, d) for i in range(1, num_stages) for d in new[i]
                if not any(d in learned[j] for j in range(i))]
  fwt = None
  if baseline is not None:
    missing = sorted({d for _, d in trained_by if d not in baseline})
    if missing:
      raise ValueError(f"baseline has no loss for {missing}")
    fwt_terms = [float(baseline[d]) - loss_SxC[i - 1, col[d]] for i, d in trained_by]
    fwt = float(np.mean(fwt_terms)) if fwt_terms else 0.0
  seen = sorted({d for i in range(last) for d in learned[i]}, key=col.get)
  forgetting = {d: float(loss_SxC[last, col[d]] - loss_SxC[:last, col[d]].min()) for d in seen}
  return {
      "bwt": float(np.mean(bwt_terms)) if bwt_terms else 0.0,
      "fwt": fwt,
      "forgetting": forgetting,
      "mean_forgetting": float(np.mean(list(forgetting.values()))) if forgetting else 0.0,
      "average_loss": float(loss_SxC[last].mean()),
  }
