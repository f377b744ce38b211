"""The `config.replay` group: which replay rows to keep, how many, under what compute caps.

Unit of selection: one packed row (data.seq_len tokens) of a replay domain's
training store; its id is the row index inside that store, stable for a given
store cache key (recorded in the selection's meta.json).

Replay amount -> mixture: with replay fraction r (`replay.fraction`: replay
tokens / T tokens) and q_T the share of T among the stage's non-replay domains
(1.0 without distill domains), the replay domains get total weight
p = r*q_T / (1 + r*q_T); with `replay.tokens` R > 0 instead, p = R / (the
stage's tokens). p is split over the replay domains in proportion to their
selected rows (each buffer row equally often); the other domains keep their
configured relative weights and share 1 - p. With `ramp` q, p moves linearly over the
stage, mean p (replay/planner.py `ramp_share`). The
buffer holds replay_tokens / (seq_len * epochs) rows and is cycled epoch
after epoch by the mixer.
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

from cpt_jax.schema import deprecated

STRATEGIES = ("random", "proportional", "teacher_loss", "forgetting", "diversity", "gradient",
              "online", "steered", "dro")
SCORED = ("teacher_loss", "forgetting", "diversity", "gradient", "dro")
ONLINE_SCORES = ("loss", "kl")


def default_replay_config() -> ml_collections.ConfigDict:
  """All `replay.*` keys; strategy '' leaves replay as configured in `data`."""
  return config_dict.create(
      strategy="",  # '' (off), 'random', 'proportional', 'teacher_loss', 'forgetting',
      # 'diversity', 'gradient', 'dro', 'online' or 'steered' (see cpt_jax/replay/strategies.py).
      fraction=0.05,  # Replay tokens / T's tokens in the stage, in (0, 1] (unless tokens > 0).
      tokens=0.0,  # Replay tokens as a count (0: use fraction). A float, so 2e9 parses.
      budget=deprecated.UNSET,  # Deprecated (removed in the next release): fraction (<= 1)
      # or tokens (> 1); validation moves it there. -1: not set.
      epochs=1.0,  # Mean passes over the buffer: buffer rows = replay tokens / (L * epochs).
      ramp=0.0,  # q in [-1, 1]: the replay share moves linearly over the stage, (1 - q) p ->
      # (1 + q) p (mean p, the same replay tokens); 1 replays late, -1 early (replay/planner.py).
      ramp_every=50,  # ramp != 0: steps between the share's changes (piecewise constant).
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
      grad_batches=4,  # gradient: T batches averaged into T's last-layer gradient.
      grad_sign=True,  # gradient: align with sign(T's gradient) (Adam's first step), not it.
      dro_temperature=0.5,  # dro: rows drawn with probability ~ exp(M's loss / this), in
      # nats per token (replay/dro.py); large: uniform, small: the highest-loss rows.
      online_every=100,  # online, steered: steps between refreshes.
      online_pool=256,  # online: fresh candidates scored per refresh (rolling window).
      online_swap=0.25,  # online: most buffer rows swapped per refresh; steered: the oldest
      # rows swapped for fresh ones per refresh (fraction).
      online_init="proportional",  # online, steered: the initial buffer ('random' or
      # 'proportional').
      online_score="loss",  # online: a row's interference. 'loss': its loss now minus
      # under M (M's losses kept; one forward a buffer row, two a candidate); 'kl': its mean
      # KL(M || now) per token at objective.kd_temperature (what replay KD pulls back; two
      # forwards a buffer row or candidate).
      online_quota=0.0,  # online: 0 keeps each domain's buffer rows; a in (0, 1] re-allocates
      # them at each refresh, share a by each domain's measured forgetting (replay/quota.py).
      steer_quota=0.5,  # steered: share of the buffer re-split at each refresh by each
      # replay domain's rise in training loss (replay/steer.py); 0 keeps the split.
  )


def upgrade_replay_config(c: ml_collections.ConfigDict, where: str = "replay") -> None:
  """Moves a set deprecated `budget` into `fraction` (<= 1) or `tokens` (> 1), in place."""
  budget = c.get("budget", deprecated.UNSET)
  if budget == deprecated.UNSET:
    return
  if not (math.isfinite(budget) and budget > 0):
    raise ValueError(f"{where}.budget={budget} (deprecated) must be > 0; set "
                     f"{where}.fraction or {where}.tokens instead")
  defaults = default_replay_config()
  new = "fraction" if budget <= 1 else "tokens"
  deprecated.move(c, where, "budget", new, {k: defaults[k] for k in ("fraction", "tokens")},
                  f"{where}.budget is deprecated (removed in the next release): use "
                  f"{where}.fraction (<= 1) or {where}.tokens (> 1); read as "
                  f"{where}.{new}={budget:g}")


def validate_replay_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending `replay.*` key (after `upgrade_replay_config`)."""
  upgrade_replay_config(c)
  if c.strategy and c.strategy not in STRATEGIES:
    raise ValueError(f"replay.strategy={c.strategy!r}; expected '' or one of {STRATEGIES}")
  if not (math.isfinite(c.fraction) and 0 < c.fraction <= 1):
    raise ValueError(f"replay.fraction={c.fraction} must be in (0, 1] (replay tokens / T's "
                     "tokens); set replay.tokens for a token count")
  if not (math.isfinite(c.tokens) and (c.tokens == 0 or c.tokens >= 1)):
    raise ValueError(f"replay.tokens={c.tokens} must be 0 (use replay.fraction) or a token "
                     "count >= 1; set replay.fraction for a fraction of T's tokens")
  if c.tokens > 0 and c.fraction != default_replay_config().fraction:
    raise ValueError(f"replay.fraction={c.fraction} and replay.tokens={c.tokens} are both "
                     "set; set one (fraction: of T's tokens; tokens: a count)")
  if not c.epochs > 0:
    raise ValueError(f"replay.epochs={c.epochs} must be > 0")
  if not (math.isfinite(c.ramp) and -1.0 <= c.ramp <= 1.0):
    raise ValueError(f"replay.ramp={c.ramp} must be in [-1, 1]")
  if c.ramp and not c.strategy:
    raise ValueError(f"replay.ramp={c.ramp} moves the share of a replay selection, which "
                     "replay.strategy='' turns off: set a strategy or the ramp to 0")
  if not (isinstance(c.ramp_every, int) and c.ramp_every >= 1):
    raise ValueError(f"replay.ramp_every={c.ramp_every!r} must be an int >= 1")
  if c.max_tflops < 0 or c.max_seconds < 0:
    raise ValueError("replay.max_tflops / replay.max_seconds must be >= 0")
  if not 0 <= c.selection_fraction <= 1:
    raise ValueError(f"replay.selection_fraction={c.selection_fraction} must be in [0, 1]")
  if not 0.0 <= c.band_low < c.band_high <= 1.0:
    raise ValueError(f"replay.band_low={c.band_low} / band_high={c.band_high}: need "
                     "0 <= low < high <= 1")
  if c.grad_batches < 1:
    raise ValueError(f"replay.grad_batches={c.grad_batches} must be >= 1")
  if c.online_every < 1 or c.online_pool < 0 or not 0 <= c.online_swap <= 1:
    raise ValueError("replay.online_every >= 1, online_pool >= 0, 0 <= online_swap <= 1")
  if c.online_score not in ONLINE_SCORES:
    raise ValueError(f"replay.online_score={c.online_score!r}; one of {ONLINE_SCORES}")
  if not 0.0 <= c.online_quota <= 1.0:
    raise ValueError(f"replay.online_quota={c.online_quota} must be in [0, 1]")
  if not 0.0 <= c.steer_quota <= 1.0:
    raise ValueError(f"replay.steer_quota={c.steer_quota} must be in [0, 1]")
  if not (math.isfinite(c.dro_temperature) and c.dro_temperature > 0):
    raise ValueError(f"replay.dro_temperature={c.dro_temperature} must be > 0")
  if c.online_init not in ("random", "proportional"):
    raise ValueError(f"replay.online_init={c.online_init!r}; 'random' or 'proportional'")
