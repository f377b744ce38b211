"""Multi-host start-up through JAX's own distributed runtime.

`launch_args(dist_cfg, environ)` decides, from the config and the environment alone
(no JAX call), whether this process is one of several and with which arguments
`jax.distributed.initialize` runs; `maybe_initialize` makes that one call, before
anything else touches JAX (the command line calls it first, main.py).

The three fields (coordinator address, process count, process id) are read per field,
the first that is set winning:

  config.distributed.coordinator_address / num_processes / process_id
  CPT_COORDINATOR_ADDRESS / CPT_NUM_PROCESSES / CPT_PROCESS_ID
  COORDINATOR / NUM_PROCESSES / PROCESS_ID           (README, launch/gpu_multinode.sh)
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID

Launchers JAX recognises itself fill what is missing (`jax.distributed.initialize()`
auto-detects them): SLURM (`SLURM_JOB_ID`, `SLURM_NTASKS` > 1, ...), Open MPI
(`OMPI_MCA_orte_hnp_uri`, `OMPI_COMM_WORLD_SIZE` > 1), Cloud TPU on GKE
(`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` naming > 1 host). On a TPU VM slice
launch/tpu_pod.sh passes `--config.distributed.initialize=yes` (`CPT_DISTRIBUTED=1` in
the environment does the same): JAX then reads the rest from the TPU metadata server.

With `initialize='auto'` a half-configured launch (a coordinator but no process count,
NUM_PROCESSES > 1 without a process id, ...) and no launcher to fill it in is an error
naming what is set and what is missing, never N independent runs in one workdir.
`CPT_DISTRIBUTED=0` (or `initialize='no'`) keeps a single process.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
from absl import logging

MODES = ("auto", "yes", "no")
# Per field: the config key, then the environment variables, in the order they win.
FIELDS = {
    "coordinator_address": ("CPT_COORDINATOR_ADDRESS", "COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("CPT_NUM_PROCESSES", "NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("CPT_PROCESS_ID", "PROCESS_ID", "JAX_PROCESS_ID"),
}
# What JAX's cluster detection (jax._src.clusters) needs for SLURM and Open MPI.
_SLURM = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
         "OMPI_COMM_WORLD_LOCAL_RANK")


def _int(value: str, name: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer") from None


def explicit_fields(dist_cfg, environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
  """{field: (value, where it came from)} of the fields set by the config or a variable."""
  out: dict[str, tuple[Any, str]] = {}
  cfg = {"coordinator_address": str(dist_cfg.coordinator_address or ""),
         "num_processes": int(dist_cfg.num_processes), "process_id": int(dist_cfg.process_id)}
  unset = {"coordinator_address": "", "num_processes": 0, "process_id": -1}
  for field, names in FIELDS.items():
    if cfg[field] != unset[field]:
      out[field] = (cfg[field], f"distributed.{field}")
      continue
    for name in names:
      if environ.get(name, "") != "":
        value = environ[name]
        out[field] = (value if field == "coordinator_address" else _int(value, name), name)
        break
  return out


def cluster(environ: Mapping[str, str]) -> tuple[str, int] | None:
  """(name, process count) of a launcher JAX detects itself, or None."""
  if all(k in environ for k in _SLURM):
    return "SLURM", _int(environ["SLURM_NTASKS"], "SLURM_NTASKS")
  if all(k in environ for k in _OMPI):
    return "Open MPI", _int(environ["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE")
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
  if hosts:
    return "Cloud TPU", len([h for h in hosts.split(",") if h.strip()])
  return None


def launch_args(dist_cfg, environ: Mapping[str, str]) -> dict[str, Any] | None:
  """The keyword arguments of `jax.distributed.initialize` for this process, or None for a
  single-process run; ValueError for a bad mode or a half-configured launch.

  `{}` lets JAX detect everything (SLURM, Open MPI, Cloud TPU).
  """
  mode = str(dist_cfg.initialize)
  if mode not in MODES:
    raise ValueError(f"distributed.initialize={mode!r}; expected one of {MODES}")
  if mode == "no":
    return None
  flag = environ.get("CPT_DISTRIBUTED", "")
  if mode == "auto" and flag == "0":
    return None
  forced = mode == "yes" or flag not in ("", "0")
  fields = explicit_fields(dist_cfg, environ)
  for field, (value, where) in fields.items():
    if field == "num_processes" and value < 1:
      raise ValueError(f"{where}={value}: the process count must be >= 1")
    if field == "process_id" and value < 0:
      raise ValueError(f"{where}={value}: the process id must be >= 0")
  kwargs = {k: v for k, (v, _) in fields.items()}
  if "num_processes" in kwargs and "process_id" in kwargs and \
      not kwargs["process_id"] < kwargs["num_processes"]:
    raise ValueError(f"{fields['process_id'][1]}={kwargs['process_id']} is not below "
                     f"{fields['num_processes'][1]}={kwargs['num_processes']}")
  found = cluster(environ)
  if kwargs.get("num_processes") == 1 and not forced:
    return None
  if len(kwargs) == len(FIELDS) or forced:
    return kwargs  # JAX fills what is missing (cluster detection, TPU metadata) or says so
  if kwargs:
    if found is not None:
      return kwargs
    missing = [f for f in FIELDS if f not in fields]
    have = ", ".join(f"{where}={value!r}" for value, where in fields.values())
    raise ValueError(
        f"a half-configured multi-process launch: {have} is set, but no "
        + " and no ".join(missing) + " (set " + "; ".join(
            f"distributed.{f} or {' / '.join(FIELDS[f])}" for f in missing)
        + "), and no SLURM / Open MPI / Cloud TPU launcher to read it from. Without them "
        "every process would run alone in one workdir; for a single process unset the "
        "variables or set distributed.initialize='no'")
  if found is not None and found[1] > 1:
    return {}
  return None


def is_initialized() -> bool:
  """Whether `jax.distributed.initialize` ran in this process."""
  return jax.distributed.is_initialized()


def maybe_initialize(dist_cfg, environ: Mapping[str, str] | None = None) -> None:
  """Calls `jax.distributed.initialize` once, when `launch_args` asks; a no-op otherwise."""
  if is_initialized():
    return
  kwargs = launch_args(dist_cfg, os.environ if environ is None else environ)
  if kwargs is None:
    return
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # JAX found no launcher to fill the missing fields
    raise ValueError(
        f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): "
        f"{e} Set distributed.coordinator_address / num_processes / process_id (or "
        "COORDINATOR / NUM_PROCESSES / PROCESS_ID), or start it under SLURM / Open MPI / "
        "a Cloud TPU slice") from e
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
