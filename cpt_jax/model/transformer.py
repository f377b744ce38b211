"""Llama-family decoder-only transformer in Flax (linen).

RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, optional tied
embeddings, optional QKV biases (Qwen2), compute dtype f32 or bf16 with f32
parameters, optional remat and scan over layers. Attention honours packed rows:
a token attends only to earlier tokens of its own segment, and rotary phases
come from per-document `positions`.

Routed gradients (the sigma / tau layout's single backward pass,
train/decomposition.py): when the params tree has a top-level `adapter_rows` entry
([B] of 0 / 1, not a parameter), each parameter's gradient sums the rows of one kind
only: the adapters `lora_a` [*in, r] / `lora_b` [r, *out] beside a Dense kernel (which
then computes x (W + A B)), or a full-shape `delta` beside it (x (W + delta), W then
takes no gradient), take the rows marked 1, every other parameter (kernels, biases, norm
scales, embeddings) the rows marked 0; activation cotangents flow back through all rows,
once.

Every parameter carries logical axis names (see `cpt_jax/parallel/sharding.py`
for the rules that map them onto the mesh). Shape suffixes: the table in
`cpt_jax/batch.py` (B batch rows, L positions, D d_model, H query heads, K
key/value heads, G = H / K, E head width, F MLP width, V vocabulary).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpt_jax.model import rope

Array = jax.Array
ADAPTER_ROWS = "adapter_rows"  # top-level params entry: [B] rows whose cotangents train adapters
DELTA = "delta"  # a Dense's params entry beside `kernel`: a full-shape delta the rows train

# The primitives of cuDNN's attention forward (jax.nn.dot_product_attention with
# implementation='cudnn'): their outputs, the attention output and its softmax statistics,
# are what the attention's backward reads.
CUDNN_ATTENTION_FWD = frozenset({"dot_product_attention_fwd_wrapper", "dot_product_attention_fwd"})


def _dots_no_batch_and_attention(prim, *args, **params) -> bool:
  """`dots_no_batch`, and the cuDNN attention forward's outputs kept (about B*L*D bf16 a
  layer), so the backward does not run the forward kernel again; with other attention
  kinds the same as `dots_no_batch`."""
  return (prim.name in CUDNN_ATTENTION_FWD
          or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_no_batch_attention": _dots_no_batch_and_attention,
}


# 'native': the einsum attention below (fastest on CPU); 'dot_product':
# jax.nn.dot_product_attention (XLA); 'cudnn': the same call with cuDNN's fused
# flash-attention kernel (NVIDIA GPUs only).


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters (mirrors `config.model`)."""

  vocab_size: int = 259
  vocab_pad_multiple: int = 128  # tables padded so 'vocab' shards evenly; logits sliced back
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0  # 0: d_model // num_heads
  mlp_dim: int = 1024
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: str = ""  # '', 'linear' or 'llama3'
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  tie_embeddings: bool = False
  qkv_bias: bool = False
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype: 'float32' or 'bfloat16'
  remat: str = "none"  # one of REMAT_POLICIES
  scan_layers: bool = False
  attention: str = "native"  # one of config.ATTENTION_KINDS

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def padded_vocab_size(self) -> int:
    m = max(1, self.vocab_pad_multiple)
    return -(-self.vocab_size // m) * m

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    """Builds from a ConfigDict/dict holding (a superset of) these fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    items = cfg.items() if hasattr(cfg, "items") else dict(cfg).items()
    return cls(**{k: v for k, v in items if k in names})


def route_param_grad(fn, param, rows_B: Array, *inputs):
  """fn(param, *inputs) -> [B, ...] whose cotangent to `param` (an array or a tuple)
  sums only the rows with rows_B = 1 (a [B] 0 / 1 mask); the inputs get fn's cotangents
  from every row (none for integer inputs, e.g. token ids)."""

  @jax.custom_vjp
  def routed(p, rows, *xs):
    del rows
    return fn(p, *xs)

  def fwd(p, rows, *xs):
    return fn(p, *xs), (p, rows, xs)

  def bwd(res, dy_BxX):
    p, rows, xs = res
    mask = rows.astype(dy_BxX.dtype).reshape((-1,) + (1,) * (dy_BxX.ndim - 1))
    _, vjp_p = jax.vjp(lambda q: fn(q, *xs), p)
    (dp,) = vjp_p(dy_BxX * mask)
    diff = [i for i, x in enumerate(xs) if jnp.issubdtype(x.dtype, jnp.inexact)]
    dxs = [None] * len(xs)
    if diff:
      def of_inputs(*d):
        full = list(xs)
        for i, v in zip(diff, d):
          full[i] = v
        return fn(p, *full)

      _, vjp_x = jax.vjp(of_inputs, *(xs[i] for i in diff))
      for i, g in zip(diff, vjp_x(dy_BxX)):
        dxs[i] = g
    return (dp, None, *dxs)

  routed.defvjp(fwd, bwd)
  return routed(param, rows_B, *inputs)


def _mask_rows(x_NxX, rows_N):
  return x_NxX * rows_N.astype(x_NxX.dtype)[:, None]


@jax.custom_vjp
def routed_matmul(x_NxK, w_KxM, base_N):
  """x @ w [N, M] whose dw sums only the rows with base_N = 1 (dx from every row)."""
  del base_N
  return x_NxK @ w_KxM


def _routed_matmul_fwd(x_NxK, w_KxM, base_N):
  return x_NxK @ w_KxM, (x_NxK, w_KxM, base_N)


def _routed_matmul_bwd(res, dy_NxM):
  x_NxK, w_KxM, base_N = res
  # Mask the narrower operand: the same masked input is shared by q / k / v (CSE).
  if x_NxK.shape[1] <= dy_NxM.shape[1]:
    dw = _mask_rows(x_NxK, base_N).T @ dy_NxM
  else:
    dw = x_NxK.T @ _mask_rows(dy_NxM, base_N)
  return dy_NxM @ w_KxM.T, dw, None


routed_matmul.defvjp(_routed_matmul_fwd, _routed_matmul_bwd)


def _merged(w_KxM, a_KxR, b_RxM, dtype):
  """(w + a b) in the parameters' precision, then cast to the compute dtype (as merging
  tau into the weights does)."""
  return (w_KxM + a_KxR @ b_RxM).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def adapted_matmul(x_NxK, w_KxM, a_KxR, b_RxM, adapter_N, dtype):
  """x (w + a b) [N, M] (w, a, b in float32, x in `dtype`): dw from the rows with
  adapter_N = 0, da / db from the rows with adapter_N = 1, dx from every row. The
  adapters' gradients cost O(N (K + M) R): da = x^T (m dy b^T), db = (m x a)^T dy,
  never a full-size [K, M] product."""
  del adapter_N
  return x_NxK @ _merged(w_KxM, a_KxR, b_RxM, dtype)


def _adapted_matmul_fwd(x_NxK, w_KxM, a_KxR, b_RxM, adapter_N, dtype):
  w_eff = _merged(w_KxM, a_KxR, b_RxM, dtype)
  return x_NxK @ w_eff, (x_NxK, w_eff, a_KxR, b_RxM, adapter_N)


def _adapted_matmul_bwd(dtype, res, dy_NxM):
  x_NxK, w_eff, a_KxR, b_RxM, adapter_N = res
  dx, dw, _ = _routed_matmul_bwd((x_NxK, w_eff, 1.0 - adapter_N), dy_NxM)
  da = x_NxK.T @ _mask_rows(dy_NxM @ b_RxM.T.astype(dtype), adapter_N)
  db = _mask_rows(x_NxK @ a_KxR.astype(dtype), adapter_N).T @ dy_NxM
  f32 = jnp.float32
  return dx, dw.astype(f32), da.astype(f32), db.astype(f32), None


adapted_matmul.defvjp(_adapted_matmul_fwd, _adapted_matmul_bwd)


def _apply(fn, param, rows_B, *inputs):
  """fn(param, *inputs); with `rows_B` the param's gradient takes those rows only."""
  if rows_B is None:
    return fn(param, *inputs)
  return route_param_grad(fn, param, rows_B, *inputs)


def _base_rows(adapter_rows_B):
  """The rows whose cotangents train the base (non-adapter) parameters."""
  return None if adapter_rows_B is None else 1.0 - adapter_rows_B


def _init(std: float, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


class RMSNorm(nn.Module):
  """Root-mean-square norm; statistics in float32."""

  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxLxD: Array, adapter_rows_B: Array | None = None) -> Array:
    scale_D = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        (x_BxLxD.shape[-1],), jnp.float32)
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return _apply(lambda s, xn: (xn * s).astype(self.dtype), scale_D,
                  _base_rows(adapter_rows_B), x)


class Dense(nn.Module):
  """x [..., *in] @ kernel [*in, *out] (+ bias [*out]) with logical axis names. With
  `adapter_rows_B` (routed gradients) the kernel takes the other rows' gradient, and
  adapters lora_a [*in, r] and lora_b [r, *out] in the params add x A B to the product;
  or a `delta` [*in, *out] in the params adds x delta and alone takes the adapter rows'
  weight gradient (the kernel none)."""

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  names: tuple[str | None, ...]
  std: float
  dtype: Any
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, adapter_rows_B: Array | None = None):
    kernel = self.param("kernel", _init(self.std, self.names),
                        self.in_shape + self.out_shape, jnp.float32)
    # One 2-D matmul [rows, fan-in] @ [fan-in, fan-out]: on CPU a dot contracting
    # over several batch-like dims runs at half speed in the backward pass.
    n_in = len(self.in_shape)
    lead = x.shape[:x.ndim - n_in]
    k = math.prod(self.in_shape)
    dt = self.dtype

    x_NxK = x.astype(dt).reshape(-1, k)
    w_KxM = kernel.astype(dt).reshape(k, -1)
    if adapter_rows_B is None:
      y_NxM = x_NxK @ w_KxM
    else:  # routed gradients: each row's cotangents train the base or the adapters
      rows_N = jnp.broadcast_to(adapter_rows_B.reshape((-1,) + (1,) * (len(lead) - 1)),
                                lead).reshape(-1)
      if self.has_variable("params", "lora_a"):
        a, b = self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b")
        y_NxM = adapted_matmul(x_NxK, kernel.reshape(k, -1), a.reshape(k, -1),
                               b.reshape(b.shape[0], -1), rows_N, jnp.dtype(dt))
      elif self.has_variable("params", DELTA):
        # A full-shape delta beside a kernel the delta alone trains (subtree tau): x (W + d)
        # whose weight gradient, from the adapter rows only, reaches d; W gets none.
        d = self.get_variable("params", DELTA)
        w_eff = (jax.lax.stop_gradient(kernel) + d).astype(dt).reshape(k, -1)
        y_NxM = routed_matmul(x_NxK, w_eff, rows_N)
      else:
        y_NxM = routed_matmul(x_NxK, w_KxM, 1.0 - rows_N)
    y = y_NxM.reshape(*lead, *self.out_shape)
    base_rows = _base_rows(adapter_rows_B)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.names[len(self.in_shape):]), self.out_shape, jnp.float32)
      y = _apply(lambda b, y: y + b.astype(dt), bias, base_rows, y)
    return y


def _native_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, same_doc_BxLxL, dt) -> Array:
  """Causal attention within documents, GQA: [B, L, H, E] x [B, L, K, E] -> [B, L, H, E]."""
  b, l, h, e = q_BxLxHxE.shape
  k = k_BxLxKxE.shape[2]
  g = h // k
  # Heads-major layout [B, K, G, L, E] so both attention matmuls are batched
  # GEMMs with leading batch dims (twice as fast on CPU as a mixed layout).
  q_BxKxGxLxE = jnp.transpose(
      (q_BxLxHxE * jnp.asarray(e ** -0.5, dt)).reshape(b, l, k, g, e), (0, 2, 3, 1, 4))
  k_BxKxLxE = jnp.transpose(k_BxLxKxE, (0, 2, 1, 3))
  v_BxKxLxE = jnp.transpose(v_BxLxKxE, (0, 2, 1, 3))
  logits_BxKxGxLxL = jnp.einsum(
      "bkgqe,bkte->bkgqt", q_BxKxGxLxE, k_BxKxLxE).astype(jnp.float32)
  causal_LxL = jnp.tril(jnp.ones((l, l), jnp.bool_))
  mask_Bx1x1xLxL = (same_doc_BxLxL & causal_LxL)[:, None, None]
  logits_BxKxGxLxL = jnp.where(mask_Bx1x1xLxL, logits_BxKxGxLxL, -1e30)
  # Softmax with the normalisation applied after the value matmul (one
  # [L, E] divide instead of an [L, L] one); the max shift is a constant.
  shift = jax.lax.stop_gradient(jnp.max(logits_BxKxGxLxL, axis=-1, keepdims=True))
  unnorm_BxKxGxLxL = jnp.exp(logits_BxKxGxLxL - shift)
  denom_BxKxGxLx1 = jnp.sum(unnorm_BxKxGxLxL, axis=-1, keepdims=True)
  out_BxKxGxLxE = jnp.einsum("bkgqt,bkte->bkgqe", unnorm_BxKxGxLxL.astype(dt), v_BxKxLxE)
  out_BxKxGxLxE = out_BxKxGxLxE / denom_BxKxGxLx1.astype(dt)
  return jnp.transpose(out_BxKxGxLxE, (0, 3, 1, 2, 4)).reshape(b, l, h, e)


class Attention(nn.Module):
  """Grouped-query self-attention over packed rows."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, adapter_rows_B=None):
    c = self.cfg
    h, k, e = c.num_heads, c.num_kv_heads, c.resolved_head_dim
    dt = c.compute_dtype
    out_std = c.init_std / (2 * c.num_layers) ** 0.5

    def proj(name, heads, axis_name):
      return Dense((c.d_model,), (heads, e), ("embed", axis_name, "head_dim"), c.init_std,
                   dt, use_bias=c.qkv_bias, name=name)(x_BxLxD, adapter_rows_B)

    q_BxLxHxE = proj("q", h, "q_heads")
    k_BxLxKxE = proj("k", k, "kv_heads")
    v_BxLxKxE = proj("v", k, "kv_heads")

    sin_BxLxE, cos_BxLxE = rope.sin_cos(positions_BxL, e, c)
    q_BxLxHxE = rope.apply(q_BxLxHxE, sin_BxLxE, cos_BxLxE)
    k_BxLxKxE = rope.apply(k_BxLxKxE, sin_BxLxE, cos_BxLxE)

    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    if c.attention == "native":
      out_BxLxHxE = _native_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, same_doc_BxLxL, dt)
    else:
      out_BxLxHxE = jax.nn.dot_product_attention(
          q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask=same_doc_BxLxL[:, None], is_causal=True,
          implementation="cudnn" if c.attention == "cudnn" else None)
    out_BxLxHxE = nn.with_logical_constraint(
        out_BxLxHxE, ("activation_batch", "activation_length", "activation_heads", None))
    return Dense((h, e), (c.d_model,), ("q_heads", "head_dim", "embed"), out_std, dt,
                 name="o")(out_BxLxHxE, adapter_rows_B)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, adapter_rows_B=None):
    c = self.cfg
    dt = c.compute_dtype

    def dense(name, n_in, n_out, names, std, x):
      return Dense((n_in,), (n_out,), names, std, dt, name=name)(x, adapter_rows_B)

    gate_BxLxF = dense("gate", c.d_model, c.mlp_dim, ("embed", "mlp"), c.init_std, x_BxLxD)
    up_BxLxF = dense("up", c.d_model, c.mlp_dim, ("embed", "mlp"), c.init_std, x_BxLxD)
    h_BxLxF = nn.silu(gate_BxLxF) * up_BxLxF
    h_BxLxF = nn.with_logical_constraint(
        h_BxLxF, ("activation_batch", "activation_length", "activation_mlp"))
    out_std = c.init_std / (2 * c.num_layers) ** 0.5
    return dense("down", c.mlp_dim, c.d_model, ("mlp", "embed"), out_std, h_BxLxF)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, adapter_rows_B=None):
    c = self.cfg
    rows = adapter_rows_B
    x_BxLxD = nn.with_logical_constraint(
        x_BxLxD, ("activation_batch", "activation_length", "activation_embed"))
    h = RMSNorm(c.norm_eps, c.compute_dtype, name="attn_norm")(x_BxLxD, rows)
    x_BxLxD = x_BxLxD + Attention(c, name="attn")(h, segment_ids_BxL, positions_BxL, rows)
    h = RMSNorm(c.norm_eps, c.compute_dtype, name="mlp_norm")(x_BxLxD, rows)
    x_BxLxD = x_BxLxD + MLP(c, name="mlp")(h, rows)
    # The block's output (the residual stream), kept only when the caller makes
    # 'intermediates' mutable (`residual_streams`); otherwise a no-op.
    self.sow("intermediates", "residual", x_BxLxD)
    if c.scan_layers:
      return x_BxLxD, None
    return x_BxLxD


class Transformer(nn.Module):
  """Decoder-only LM: tokens [B, L] -> logits [B, L, V] (and final hidden [B, L, D])."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None,
               return_hidden: bool = False):
    c = self.cfg
    b, l = tokens_BxL.shape
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))

    dt = c.compute_dtype
    rows_B = (self.get_variable("params", ADAPTER_ROWS)
              if self.has_variable("params", ADAPTER_ROWS) else None)
    base_rows_B = _base_rows(rows_B)
    embed = nn.Embed(
        num_embeddings=c.padded_vocab_size, features=c.d_model, dtype=dt,
        param_dtype=jnp.float32, name="embed",
        embedding_init=_init(c.init_std if c.tie_embeddings else 1.0,
                             ("vocab", "embed")))
    if rows_B is None:
      x_BxLxD = embed(tokens_BxL)
    else:
      x_BxLxD = route_param_grad(lambda t, ids: jnp.take(t, ids, axis=0).astype(dt),
                                 embed.embedding, base_rows_B, tokens_BxL)

    layer_cls = DecoderLayer
    if c.remat != "none":
      if c.remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={c.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
      layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[c.remat],
                           prevent_cse=not c.scan_layers)
    if c.scan_layers:
      stack = nn.scan(
          layer_cls, variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")
      x_BxLxD, _ = stack(x_BxLxD, segment_ids_BxL, positions_BxL, rows_B)
    else:
      for i in range(c.num_layers):
        x_BxLxD = layer_cls(c, name=f"layers_{i}")(x_BxLxD, segment_ids_BxL, positions_BxL,
                                                   rows_B)

    hidden_BxLxD = RMSNorm(c.norm_eps, dt, name="final_norm")(x_BxLxD, rows_B)
    if c.tie_embeddings and rows_B is None:
      logits_BxLxV = embed.attend(hidden_BxLxD)
    elif c.tie_embeddings:
      logits_BxLxV = route_param_grad(lambda t, h: h @ t.astype(dt).T, embed.embedding,
                                      base_rows_B, hidden_BxLxD)
    else:
      logits_BxLxV = Dense((c.d_model,), (c.padded_vocab_size,), ("embed", "vocab"),
                           c.init_std, dt, name="lm_head")(hidden_BxLxD, rows_B)
    if c.padded_vocab_size != c.vocab_size:
      logits_BxLxV = logits_BxLxV[..., :c.vocab_size]
    logits_BxLxV = nn.with_logical_constraint(
        logits_BxLxV, ("activation_batch", "activation_length", "activation_vocab"))
    if return_hidden:
      return logits_BxLxV, hidden_BxLxD
    return logits_BxLxV


def residual_streams(intermediates: dict, num_layers: int) -> Array:
  """Every block's output [K, B, L, D] from `apply(..., mutable=["intermediates"])`'s
  'intermediates' collection (K = num_layers; scanned or unrolled layers)."""
  if "layers" in intermediates:  # scan_layers: one sown value stacked over K
    return intermediates["layers"]["residual"][0]
  return jnp.stack([intermediates[f"layers_{i}"]["residual"][0] for i in range(num_layers)])


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls (embedding lookup excluded)."""
  e = cfg.resolved_head_dim
  attn = cfg.d_model * e * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * cfg.d_model * cfg.mlp_dim
  return cfg.num_layers * (attn + mlp) + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
  """Model FLOPs per token: 2 per matmul weight and attention score (x3 for training).

  Attention is counted over the full L x L score matrix (PaLM's convention).
  """
  fwd = 2 * matmul_params(cfg) + 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.resolved_head_dim
  return 3 * fwd if training else fwd
