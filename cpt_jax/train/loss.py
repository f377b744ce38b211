"""Token losses and their per-row / per-domain / per-role reductions (pure, jit-safe)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy(logits_BxLxV: Array, targets_BxL: Array) -> tuple[Array, Array]:
  """Token cross-entropy [B, L] and log-partition [B, L], both float32."""
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return log_z_BxL - target_logit_BxL, log_z_BxL


def row_sums(x_BxL: Array, weights_BxL: Array) -> Array:
  """Weighted sum over each row: [B]."""
  return jnp.sum(x_BxL * weights_BxL, axis=-1)


def group_sums(values_B: Array, group_ids_B: Array, num_groups: int) -> Array:
  """Sums row values into U groups (domains or roles): [U], U = num_groups.

  A one-hot matmul rather than a scatter: sharding-friendly and cheap for the
  few hundred groups a run has.
  """
  onehot_BxU = jax.nn.one_hot(group_ids_B, num_groups, dtype=jnp.float32)
  return values_B.astype(jnp.float32) @ onehot_BxU


def safe_div(num, den):
  return num / jnp.maximum(den, 1e-9)
