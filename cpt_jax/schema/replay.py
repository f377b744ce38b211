"""The `config.replay` group: which replay rows to keep, under what budget.

Unit of selection: one packed row (data.seq_len tokens) of a replay domain's
training store; its id is the row index inside that store, stable for a given
store cache key (recorded in the selection's meta.json).

Budget -> mixture: with replay fraction r (replay tokens / T tokens) and q_T
the share of T among the stage's non-replay domains (1.0 without distill
domains), the replay domains get total weight p = r*q_T / (1 + r*q_T), split
over them in proportion to their selected rows (each buffer row equally often);
the other domains keep their configured relative weights and share 1 - p. The
buffer holds replay_tokens / (seq_len * epochs) rows and is cycled epoch
after epoch by the mixer.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

STRATEGIES = ("random", "proportional", "teacher_loss", "forgetting", "diversity", "online")
SCORED = ("teacher_loss", "forgetting", "diversity")


def default_replay_config() -> ml_collections.ConfigDict:
  """All `replay.*` keys; strategy '' leaves replay as configured in `data`."""
  return config_dict.create(
      strategy="",  # '' (off), 'random', 'proportional', 'teacher_loss', 'forgetting',
      # 'diversity' or 'online' (see cpt_jax/replay/strategies.py).
      budget=0.05,  # Replay tokens: <= 1 a fraction of T's tokens in the stage, > 1 a count.
      epochs=1.0,  # Mean passes over the buffer: buffer rows = replay tokens / (L * epochs).
      # Hard caps on the whole stage (selection + replay + teacher + T); 0 = none. The
      # planner sizes the stage to fit; training stops at the log boundary before a cap
      # would be passed (cpt_jax/train/budget.py). Both apply with or without a strategy.
      max_tflops=0.0,
      max_seconds=0.0,  # Wall clock, summed over restarts.
      selection_fraction=0.05,  # Cap on selection FLOPs as a fraction of the stage's total.
      pool_rows=0,  # Most candidates to score (0: as many as selection_fraction allows).
      score_batch=0,  # Rows per scoring batch (0: train.global_batch_size).
      stratify=True,  # Score-based strategies pick per domain (quota by domain size).
      band_low=0.5,  # teacher_loss: keep rows whose M loss lies in this quantile band
      band_high=0.9,  # (estimated on the first `sketch_rows` candidates).
      sketch_rows=1024,  # teacher_loss: candidates used to estimate the band.
      lookahead_steps=4,  # forgetting: virtual sign-SGD steps on T batches.
      lookahead_lr=0.0,  # forgetting: step size (0: optimizer.lr, Adam's first-step size).
      coreset_factor=4,  # diversity: streaming coreset holds factor * k embeddings.
      online_every=100,  # online: steps between refreshes.
      online_pool=256,  # online: fresh candidates scored per refresh (rolling window).
      online_swap=0.25,  # online: most buffer rows swapped per refresh (fraction).
      online_init="proportional",  # online: the initial buffer ('random' or 'proportional').
  )


def validate_replay_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending `replay.*` key."""
  if c.strategy and c.strategy not in STRATEGIES:
    raise ValueError(f"replay.strategy={c.strategy!r}; expected '' or one of {STRATEGIES}")
  if not c.budget > 0:
    raise ValueError(f"replay.budget={c.budget} must be > 0 (fraction <= 1 or tokens)")
  if not c.epochs > 0:
    raise ValueError(f"replay.epochs={c.epochs} must be > 0")
  if c.max_tflops < 0 or c.max_seconds < 0:
    raise ValueError("replay.max_tflops / replay.max_seconds must be >= 0")
  if not 0 <= c.selection_fraction <= 1:
    raise ValueError(f"replay.selection_fraction={c.selection_fraction} must be in [0, 1]")
  if not 0.0 <= c.band_low < c.band_high <= 1.0:
    raise ValueError(f"replay.band_low={c.band_low} / band_high={c.band_high}: need "
                     "0 <= low < high <= 1")
  if c.online_every < 1 or c.online_pool < 0 or not 0 <= c.online_swap <= 1:
    raise ValueError("replay.online_every >= 1, online_pool >= 0, 0 <= online_swap <= 1")
  if c.online_init not in ("random", "proportional"):
    raise ValueError(f"replay.online_init={c.online_init!r}; 'random' or 'proportional'")
