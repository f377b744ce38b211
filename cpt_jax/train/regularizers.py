"""What the regularisers need at a stage's start: the diagonal Fisher for EWC.

L2-SP and EWC pull parameters toward the stage's starting point theta_0 (the
teacher's params, `frozen['teacher']`); EWC weighs each coordinate by the
diagonal Fisher F estimated here from per-row gradients of the cross-entropy
on data of the old domains (replay rows and the usable part of distill
domains' validation data).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax.parallel import sharding as shd
from cpt_jax.train import loss as loss_lib


def make_fisher_fn(apply_fn: Callable, mesh, rules, param_shardings) -> Callable:
  """fisher(params, batch) -> sum over rows of (d CE_row / d theta)^2 (rows one at a time)."""

  def row_ce(params, row):
    logits = apply_fn(params, row["inputs"][None], row["segment_ids"][None],
                      row["positions"][None])
    ce, _ = loss_lib.cross_entropy(logits, row["targets"][None])
    w = row["loss_weights"][None]
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

  def fisher(params, batch):
    zeros = jax.tree.map(jnp.zeros_like, params)

    def body(acc, row):
      g = jax.grad(row_ce)(params, row)
      return jax.tree.map(lambda a, x: a + jnp.square(x), acc, g), None

    rows = {k: batch[k] for k in ("inputs", "targets", "segment_ids", "positions",
                                  "loss_weights")}
    acc, _ = jax.lax.scan(body, zeros, rows)
    return acc

  jitted = jax.jit(fisher, out_shardings=param_shardings)

  def run(params, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(params, batch)

  return run


def estimate_fisher(ctx: Any, params: Any, pipeline: Any, domains: list[str],
                    num_rows: int, seed: int = 0) -> Any:
  """Diagonal Fisher (mean of squared per-row gradients) over `num_rows` rows of `domains`."""
  fn = make_fisher_fn(ctx.apply_fn, ctx.mesh, ctx.rules, ctx.state_sh.params)
  batch = pipeline.training_rows(domains, num_rows, seed)
  batch = {k: jax.device_put(np.asarray(v), shd.replicated(ctx.mesh)) for k, v in batch.items()}
  total = fn(params, batch)
  return jax.tree.map(lambda x: x / num_rows, total)
