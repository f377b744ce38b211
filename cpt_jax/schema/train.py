"""The `config.train` group: steps, batch, cadences, warm starts, divergence, the workdir.

`default_train_config` holds every key with its comment; `validate_train_config`
checks the keys that need only this group (and the process count);
`validate_divergence` also runs for a stage's own `train` overrides.
"""

from __future__ import annotations

import copy
import sys

import ml_collections
from ml_collections import config_dict

ON_DIVERGENCE = ("stop", "rollback")  # train.on_divergence
ON_CONFIG_CHANGE = ("stop", "continue")  # train.on_config_change


def default_train_config() -> ml_collections.ConfigDict:
  """All `train.*` keys."""
  return config_dict.create(
      steps=200,  # Optimizer steps in this run (stage).
      global_batch_size=16,  # Rows per step over all processes.
      grad_accum_steps=1,  # Microbatches per step.
      z_loss=0.0,  # Coefficient of the log(Z)^2 penalty.
      log_every=10,  # Steps between metric writes.
      eval_every=0,  # Steps between per-domain validation evals (0: end only).
      eval_batches=4,  # Validation batches per domain per eval (0: all).
      checkpoint_every=100,  # Steps between checkpoints (the final step is always saved).
      keep_checkpoints=2,  # Checkpoints kept in the workdir.
      async_checkpoints=True,  # Write checkpoints in the background.
      init_checkpoint="",  # Warm-start params from this checkpoint dir (another run).
      init_from_hf="",  # Warm-start from a Hugging Face folder (config.json + safetensors);
      # sets config.model from it and data.vocab to its tokenizer when data.vocab='byte'.
      progress_bar=True,  # tqdm progress bar with rate and ETA when stderr is a terminal;
      # otherwise (pods, redirected logs) and when False, one line per log window.
      peak_flops=0.0,  # One device's peak FLOP/s; MFU divides by it x devices (0: measure).
      on_divergence="stop",  # A NaN/Inf loss or params, or a loss spike: 'stop' (naming the
      # newest good checkpoint) or 'rollback' (reload it, skip the batches since; divergence.py).
      loss_spike_factor=0.0,  # >1: a log window's mean loss above this x the previous
      # window's counts as divergence (0: off).
      max_rollbacks=3,  # 'rollback': rollbacks in a stage before it stops (kept in checkpoints).
      on_config_change="stop",  # A resume / staged rerun whose settings differ from the
      # workdir's recorded ones (config.json + config_history.jsonl) outside the allow-list
      # (train/workdir.py ALLOWED_CHANGES: train.steps extension, eval / checkpoint cadence,
      # progress bar, budget caps, mesh, ...): 'stop' before the first step, printing
      # `key: old -> new`, or 'continue' (the change and its step go into the history, the
      # summary's config_changes and report.md).
      profile_steps="",  # 'a:b': a jax.profiler trace of steps a+1..b in <workdir>/profile
      # (TensorBoard's profile plugin: tensorboard --logdir <workdir>/profile); '' = off.
      lock_stale_minutes=30.0,  # The workdir lock (run.lock) of a run on another host whose
      # heartbeat (touched every minute) is older than this is stale and taken over (0: never);
      # on this host a lock whose pid is not running always is.
  )


def validate_train_config(t: ml_collections.ConfigDict, process_count: int = 1) -> None:
  """Raises ValueError naming the offending `train.*` key."""
  if t.steps < 1:
    raise ValueError(f"train.steps={t.steps} must be >= 1")
  if t.on_config_change not in ON_CONFIG_CHANGE:
    raise ValueError(f"train.on_config_change={t.on_config_change!r}; expected one of "
                     f"{ON_CONFIG_CHANGE}")
  if t.lock_stale_minutes < 0:
    raise ValueError(f"train.lock_stale_minutes={t.lock_stale_minutes} must be >= 0 (0: never "
                     "take over another host's lock)")
  if t.grad_accum_steps < 1 or t.global_batch_size % t.grad_accum_steps:
    raise ValueError(f"train.global_batch_size={t.global_batch_size} must be divisible by "
                     f"train.grad_accum_steps={t.grad_accum_steps}")
  if t.global_batch_size % process_count:
    raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  validate_divergence(t)
  parse_profile_steps(t.profile_steps)
  if t.init_checkpoint and t.init_from_hf:
    raise ValueError("set one of train.init_checkpoint and train.init_from_hf, not both")


def validate_divergence(t: ml_collections.ConfigDict, where: str = "train") -> None:
  """`train.on_divergence` / `loss_spike_factor` / `max_rollbacks`, and enough checkpoints
  kept for a rollback to find a good one: the newest good step must still be kept when the
  divergence is found (a spike is found at the end of its log window)."""
  if t.on_divergence not in ON_DIVERGENCE:
    raise ValueError(f"{where}.on_divergence={t.on_divergence!r}; expected one of {ON_DIVERGENCE}")
  if t.loss_spike_factor != 0 and not t.loss_spike_factor > 1:
    raise ValueError(f"{where}.loss_spike_factor={t.loss_spike_factor} must be 0 (off) or > 1")
  if t.max_rollbacks < 0:
    raise ValueError(f"{where}.max_rollbacks={t.max_rollbacks} must be >= 0")
  if t.on_divergence == "rollback":
    spike = -(-t.log_every // t.checkpoint_every) if t.loss_spike_factor else 0
    need = max(2, spike + 1)
    if t.keep_checkpoints < need:
      raise ValueError(
          f"{where}.keep_checkpoints={t.keep_checkpoints}: {where}.on_divergence='rollback' needs "
          f">= {need} (the newest good step is one before the divergence"
          + (f", and before the log window of {t.log_every} steps a spike is found in, "
             f"at {where}.checkpoint_every={t.checkpoint_every})" if spike else ")"))


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """'a:b' -> (a, b) with 0 <= a < b; '' -> None; raises naming train.profile_steps."""
  if not spec:
    return None
  try:
    a, b = (int(x) for x in spec.split(":"))
  except ValueError:
    raise ValueError(f"train.profile_steps={spec!r}: expected 'a:b' (steps a+1..b)") from None
  if not 0 <= a < b:
    raise ValueError(f"train.profile_steps={spec!r}: expected 0 <= a < b")
  return a, b


def resolve_progress_bar(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of cfg whose train.progress_bar is True only when stderr is a terminal (pods
  and redirected logs get one line per log window instead: hooks.ProgressLog)."""
  out = copy.deepcopy(cfg)
  with out.unlocked():
    out.train.progress_bar = bool(cfg.train.progress_bar) and sys.stderr.isatty()
  return out
