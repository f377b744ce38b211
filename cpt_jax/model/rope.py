"""Rotary position embeddings (half-split layout, as in Llama's HF weights).

Supports the plain form and the 'linear' and 'llama3' frequency scalings.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, cfg) -> np.ndarray:
  """[E/2] inverse frequencies, with the configured scaling applied."""
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if cfg.rope_scaling in ("", None):
    return inv_freq.astype(np.float32)
  if cfg.rope_scaling == "linear":
    return (inv_freq / cfg.rope_scaling_factor).astype(np.float32)
  if cfg.rope_scaling == "llama3":
    factor = cfg.rope_scaling_factor
    low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return scaled.astype(np.float32)
  raise ValueError(f"model.rope_scaling={cfg.rope_scaling!r}; expected '', 'linear' or 'llama3'")


def sin_cos(positions_BxL, head_dim: int, cfg):
  """sin and cos tables [B, L, E] for integer positions [B, L]."""
  inv_freq = jnp.asarray(inverse_frequencies(head_dim, cfg))
  angles_BxLxHalf = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  angles_BxLxE = jnp.concatenate([angles_BxLxHalf, angles_BxLxHalf], axis=-1)
  return jnp.sin(angles_BxLxE), jnp.cos(angles_BxLxE)


def apply(x_BxLxHxE, sin_BxLxE, cos_BxLxE):
  """Rotates the head vectors: x * cos + rotate_half(x) * sin."""
  half = x_BxLxHxE.shape[-1] // 2
  x1, x2 = x_BxLxHxE[..., :half], x_BxLxHxE[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  sin = sin_BxLxE[:, :, None, :].astype(x_BxLxHxE.dtype)
  cos = cos_BxLxE[:, :, None, :].astype(x_BxLxHxE.dtype)
  return x_BxLxHxE * cos + rotated * sin
