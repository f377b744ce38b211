"""What the regularisers need at a stage's start: the diagonal Fisher for EWC.

L2-SP and EWC pull parameters toward the stage's starting point theta_0 (the
teacher's params, `frozen['teacher']`); EWC weighs each coordinate by the
diagonal Fisher F estimated here on data of the old domains (replay rows and
the usable part of distill domains' validation data):

  F = 1/N sum_n (d l_n / d theta)^2,  l_n = row n's mean token NLL of labels y_n

one row (example) at a time, so F is per example, not per token. With
`objective.ewc_fisher='true'` (default) y_n is sampled from the model's own
predictive distribution at every position (the Fisher information); with
'empirical' y_n are the data's next tokens (the empirical Fisher, squared
gradients of the training loss).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax.model.transformer import flops_per_token
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import loss as loss_lib

FISHER_MODES = ("true", "empirical")


def make_fisher_fn(apply_fn: Callable, mesh, rules, param_shardings,
                   mode: str = "true") -> Callable:
  """fisher(params, batch, keys_N) -> sum over rows of (d l_row / d theta)^2 (rows one at a time).

  l_row is the row's mean token NLL of its labels: the data's targets
  ('empirical') or, for 'true', labels drawn by jax.random.categorical(keys_N[n],
  logits) from the row's own (float32, gradient-stopped) logits, same forward.
  """
  if mode not in FISHER_MODES:
    raise ValueError(f"objective.ewc_fisher={mode!r}; expected one of {FISHER_MODES}")

  def row_nll(params, row, key):
    logits_1xLxV = apply_fn(params, row["inputs"][None], row["segment_ids"][None],
                            row["positions"][None])
    labels_1xL = row["targets"][None]
    if mode == "true":
      labels_1xL = jax.random.categorical(
          key, jax.lax.stop_gradient(logits_1xLxV[0]).astype(jnp.float32), axis=-1)[None]
    ce, _ = loss_lib.cross_entropy(logits_1xLxV, labels_1xL)
    w = row["loss_weights"][None].astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

  def fisher(params, batch, keys_N):
    zeros = jax.tree.map(jnp.zeros_like, params)

    def body(acc, row_key):
      row, key = row_key
      g = jax.grad(row_nll)(params, row, key)
      return jax.tree.map(lambda a, x: a + jnp.square(x), acc, g), None

    rows = {k: batch[k] for k in ("inputs", "targets", "segment_ids", "positions",
                                  "loss_weights")}
    acc, _ = jax.lax.scan(body, zeros, (rows, keys_N))
    return acc

  jitted = jax.jit(fisher, out_shardings=param_shardings)

  def run(params, batch, keys_N):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(params, batch, keys_N)

  return run


def fisher_rows(config) -> int:
  """Rows the stage's Fisher pass runs (objective.ewc_batches global batches)."""
  return int(config.objective.ewc_batches) * int(config.train.global_batch_size)


def fisher_tflops(config, model_cfg) -> float:
  """The Fisher pass's model TFLOPs: a forward and backward of each row (the sampled
  labels come from the same forward)."""
  L = config.data.seq_len
  return fisher_rows(config) * L * flops_per_token(model_cfg, L, training=True) / 1e12


def estimate_fisher(ctx: Any, params: Any, pipeline: Any, domains: list[str],
                    num_rows: int, seed: int = 0, mode: str | None = None) -> Any:
  """Diagonal Fisher (module docstring) over `num_rows` rows of `domains`; params-shaped.

  mode: 'true' or 'empirical' (default: ctx.config.objective.ewc_fisher). Row
  n's labels are sampled with jax.random.split(jax.random.key(seed), num_rows)[n].
  """
  mode = mode or ctx.config.objective.get("ewc_fisher", "true")
  fn = make_fisher_fn(ctx.apply_fn, ctx.mesh, ctx.rules, ctx.model_sh, mode)
  batch = pipeline.training_rows(domains, num_rows, seed)
  rep = shd.replicated(ctx.mesh)
  batch = {k: jax.device_put(np.asarray(v), rep) for k, v in batch.items()}
  keys_N = jax.device_put(jax.random.split(jax.random.key(seed), num_rows), rep)
  total = fn(params, batch, keys_N)
  return jax.tree.map(lambda x: x / num_rows, total)
