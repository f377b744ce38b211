"""The `config.decomposition` group: sigma / tau parameter decomposition (train/decomposition.py)."""

from __future__ import annotations

import re
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

MODES = ("", "lora", "subtree")


def default_decomposition_config() -> ml_collections.ConfigDict:
  """All `decomposition.*` keys; mode '' switches the decomposition off."""
  return config_dict.create(
      mode="",  # '' (off), 'lora' (tau = LoRA adapters) or 'subtree' (tau = delta on leaves).
      targets=r"attn/(q|v)/kernel",  # Regex over param paths ('layers_0/attn/q/kernel'): tau.
      lora_rank=8,  # LoRA rank r.
      lora_alpha=16.0,  # LoRA scale alpha: delta = alpha / r * A @ B.
      routing=True,  # sigma <- replay/distill rows (+ L2-SP/EWC), tau <- new rows.
      freeze_sigma=False,  # sigma gets no gradient and no optimizer state.
      skip_idle_updates=True,  # A group with no signal in a step gets an exactly-zero update.
      tau_lr=-1.0,  # tau's peak LR (<0: optimizer.lr).
      tau_schedule="",  # tau's LR schedule ('': optimizer.schedule).
      tau_warmup_steps=-1,  # tau's warmup (<0: optimizer.warmup_steps).
      tau_weight_decay=-1.0,  # tau's weight decay (<0: optimizer.weight_decay).
      eval_without_tau=True,  # Also evaluate every domain with sigma alone (summary).
  )


def validate_decomposition_config(dc: Any, key: str, lr_schedules: Sequence[str]) -> None:
  """Raises ValueError naming `<key>.<field>` (key: 'decomposition' or a stage's)."""
  if dc.mode not in MODES:
    raise ValueError(f"{key}.mode={dc.mode!r}; expected one of {MODES}")
  if not dc.mode:
    return
  try:
    re.compile(dc.targets)
  except re.error as e:
    raise ValueError(f"{key}.targets={dc.targets!r} is not a regex: {e}") from None
  if dc.mode == "lora" and (dc.lora_rank < 1 or dc.lora_alpha <= 0):
    raise ValueError(f"{key}.lora_rank={dc.lora_rank} must be >= 1 and "
                     f"{key}.lora_alpha={dc.lora_alpha} > 0")
  if dc.tau_schedule and dc.tau_schedule not in lr_schedules:
    raise ValueError(f"{key}.tau_schedule={dc.tau_schedule!r}; expected '' or one of "
                     f"{tuple(lr_schedules)}")
