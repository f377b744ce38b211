"""Runs a config: a single training run, or its sequence of stages."""

from __future__ import annotations

import ml_collections

from cpt_jax import config as config_lib
from cpt_jax import stages


def run(config: ml_collections.ConfigDict, workdir: str, **trainer_kwargs) -> dict:
  """Entry point shared by the CLI and notebooks.

  Returns the run summary, or for a staged config the report (see stages.py).
  """
  if config_lib.is_staged(config):
    return stages.run_stages(config, workdir, **trainer_kwargs)
  return stages.train(config, workdir, **trainer_kwargs)
