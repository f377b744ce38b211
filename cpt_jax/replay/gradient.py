"""Last-layer gradient alignment: how much a step on T would raise each replay row's loss.

With h_t the final hidden state (after the final norm) of token t and e_t =
softmax(logits_t) - onehot(target_t), the gradient of a row's mean token loss
with respect to the unembedding W (D x V) is G_i = (1/n_i) sum_t h_t e_t^T.
A step W <- W - lr U along T's direction U changes row i's loss by about
-lr <G_i, U>, so rows with the most negative <G_i, U> are the ones T's update
interferes with most (A-GEM, Chaudhry et al. 2019; GradMatch, Killamsetty et
al. 2021). This is the forecast of Jin & Ren, "What Will My Model Forget?
Forecasting Forgotten Examples in Language Model Refinement" (ICML 2024,
arXiv:2402.01865): an upstream example's logits move by the online examples'
logit changes times a kernel of their representations, and the examples
forecast to be forgotten are the ones to replay; here the kernel is the
unembedding's own (h_j . h_i), so the forecast needs no training. LESS (Xia et
al. 2024, arXiv:2402.04333) likewise scores candidates by their gradient's
inner product with a target's Adam-preconditioned gradient: U is T's mean G
over a few batches, or its sign (`replay.grad_sign`: Adam's first step). <G_i, U> = (1/n_i) sum_t (h_t^T U) . e_t is taken
without forming G_i: per token one D x V matmul, the size of the unembedding.

FLOPs per token (2 per multiply-add, as model.flops_per_token): the forward,
plus 2 D V (h^T U) + 2 V (the dot with e) for a candidate, plus 2 D V (h e^T)
for a T row.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Alignment:
  """Jitted T-direction and per-row alignment functions of one model."""

  def __init__(self, model):
    def residuals(params, batch):
      """(h_BxLxD, e_BxLxV): e already weighted by the row's token weights / its tokens."""
      logits_BxLxV, hidden_BxLxD = model.apply(
          {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
          return_hidden=True)
      p_BxLxV = jax.nn.softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
      e_BxLxV = p_BxLxV - jax.nn.one_hot(batch["targets"], p_BxLxV.shape[-1])
      w_BxL = batch["loss_weights"].astype(jnp.float32)
      n_B = jnp.maximum(jnp.sum(w_BxL, axis=-1), 1.0)
      return hidden_BxLxD.astype(jnp.float32), e_BxLxV * (w_BxL / n_B[:, None])[..., None]

    def t_gradient(params, batch):
      """(sum over rows of G_i (D x V), rows with tokens)."""
      h_BxLxD, e_BxLxV = residuals(params, batch)
      rows = jnp.sum(jnp.any(batch["loss_weights"] > 0, axis=-1))
      return jnp.einsum("bld,blv->dv", h_BxLxD, e_BxLxV), rows

    def alignment(params, batch, u_DxV):
      """(<G_i, U> per row,)."""
      h_BxLxD, e_BxLxV = residuals(params, batch)
      hu_BxLxV = jnp.einsum("bld,dv->blv", h_BxLxD, u_DxV)
      return (jnp.sum(hu_BxLxV * e_BxLxV, axis=(1, 2)),)

    self.t_gradient = jax.jit(t_gradient)
    self.alignment = jax.jit(alignment)


def t_direction(scorer, fns: Alignment, params: Any, batches: list[dict], sign: bool
                ) -> np.ndarray:
  """U (D x V): T's mean last-layer gradient over `batches` (or its sign); FLOPs counted
  in scorer.extra_flops (forward + 2 D V per token of every row run)."""
  if not batches:
    raise ValueError("replay.strategy='gradient' needs T batches (replay.grad_batches >= 1)")
  total, rows, run_rows = None, 0, 0
  for local in batches:
    g_DxV, n = scorer.run_batch(fns.t_gradient, params, local)
    g_DxV = np.asarray(g_DxV, np.float64)
    total = g_DxV if total is None else total + g_DxV
    rows += int(n)
    run_rows += local["inputs"].shape[0] * jax.process_count()
  d, v = total.shape
  scorer.extra_flops += run_rows * scorer.seq_len * (scorer.fwd_flops_tok + 2 * d * v)
  u_DxV = total / max(rows, 1)
  return np.sign(u_DxV).astype(np.float32) if sign else u_DxV.astype(np.float32)


def candidate_flops_per_token(u_DxV: np.ndarray) -> float:
  """What scoring a candidate token costs beyond its forward: h^T U and the dot with e."""
  d, v = u_DxV.shape
  return 2.0 * d * v + 2.0 * v
