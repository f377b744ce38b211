"""Multi-host start-up through JAX's own distributed runtime."""

from __future__ import annotations

import os

import jax
from absl import logging

# Variables that launchers (TPU VMs, SLURM, our launch/ scripts) set on every host.
_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID",
              "TPU_WORKER_HOSTNAMES", "CPT_DISTRIBUTED")


def wants_distributed(dist_cfg) -> bool:
  """Whether `config.distributed` (or the environment, for 'auto') asks for it."""
  mode = str(dist_cfg.initialize)
  if mode not in ("auto", "yes", "no"):
    raise ValueError(f"distributed.initialize={mode!r}; expected 'auto', 'yes' or 'no'")
  if mode == "no":
    return False
  if mode == "yes":
    return True
  if os.environ.get("CPT_DISTRIBUTED", "") == "0":
    return False
  return any(os.environ.get(k) for k in _ENV_HINTS) and int(
      os.environ.get("CPT_NUM_PROCESSES", os.environ.get("SLURM_NTASKS", "2"))) > 1


def maybe_initialize(dist_cfg) -> None:
  """Calls `jax.distributed.initialize` once, when asked; a no-op otherwise."""
  if not wants_distributed(dist_cfg):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if dist_cfg.coordinator_address:
    kwargs["coordinator_address"] = dist_cfg.coordinator_address
  if dist_cfg.num_processes > 0:
    kwargs["num_processes"] = int(dist_cfg.num_processes)
  if dist_cfg.process_id >= 0:
    kwargs["process_id"] = int(dist_cfg.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
