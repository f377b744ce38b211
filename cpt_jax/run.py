"""Runs a config: a single training run, or its sequence of stages."""

from __future__ import annotations

import ml_collections

from cpt_jax.train import trainer


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Entry point shared by the CLI and notebooks; returns the run summary."""
  return trainer.train(config, workdir)
