"""Model tests: packed-row attention, GQA, scan/remat equivalence, dtypes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.model import rope
from cpt_jax.model.transformer import ModelConfig, Transformer, flops_per_token, matmul_params

CFG = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64)


def _init(cfg, length=24):
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"]
  return model, nn.unbox(params)


def test_packed_row_equals_documents_alone():
  model, params = _init(CFG)
  rng = np.random.default_rng(0)
  lengths = [7, 11, 6]
  docs = [rng.integers(1, CFG.vocab_size, size=n) for n in lengths]
  tokens = np.concatenate(docs)[None]
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
  pos = np.concatenate([np.arange(n) for n in lengths])[None]
  packed = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(seg),
                       jnp.asarray(pos))
  start = 0
  for doc in docs:
    alone = model.apply({"params": params}, jnp.asarray(doc[None]))
    np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], atol=1e-5)
    start += len(doc)


def test_packing_without_segment_ids_leaks():
  """The test above can fail: ignoring segments changes the second document."""
  model, params = _init(CFG)
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(1, 61, size=8), rng.integers(1, 61, size=8)
  tokens = jnp.asarray(np.concatenate([doc_a, doc_b])[None])
  pos = jnp.asarray(np.concatenate([np.arange(8), np.arange(8)])[None])
  leaky = model.apply({"params": params}, tokens, jnp.ones((1, 16), jnp.int32), pos)
  alone = model.apply({"params": params}, jnp.asarray(doc_b[None]))
  assert np.abs(np.asarray(leaky[0, 8:]) - np.asarray(alone[0])).max() > 1e-3


def test_causal():
  model, params = _init(CFG)
  tokens = np.random.default_rng(2).integers(1, 61, size=(1, 12))
  a = model.apply({"params": params}, jnp.asarray(tokens))
  tokens2 = tokens.copy()
  tokens2[0, 8:] = 3
  b = model.apply({"params": params}, jnp.asarray(tokens2))
  np.testing.assert_allclose(a[0, :8], b[0, :8], atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch_attention"])
def test_scan_and_remat_match_unrolled(remat):
  model, params = _init(CFG)
  scan_cfg = dataclasses.replace(CFG, scan_layers=True, remat=remat)
  stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
  stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[params[f"layers_{i}"] for i in range(CFG.num_layers)])
  tokens = jnp.asarray(np.random.default_rng(3).integers(1, 61, size=(2, 16)))
  want = model.apply({"params": params}, tokens)
  got = Transformer(scan_cfg).apply({"params": stacked}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  g = jax.grad(lambda p: Transformer(scan_cfg).apply({"params": p}, tokens).sum())(stacked)
  assert np.isfinite(np.asarray(g["layers"]["mlp"]["up"]["kernel"])).all()


def _attention_like(name: str):
  """A function with a custom VJP whose forward binds a primitive called `name` (lowered as
  sin) and whose backward reads that primitive's output: cuDNN attention's structure."""
  from jax.extend.core import Primitive  # pylint: disable=g-import-not-at-top
  from jax.interpreters import mlir  # pylint: disable=g-import-not-at-top
  prim = Primitive(name)
  prim.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
  mlir.register_lowering(prim, mlir.lower_fun(jnp.sin, multiple_results=False))

  @jax.custom_vjp
  def f(x):
    return prim.bind(x)

  def fwd(x):
    out = prim.bind(x)
    return out, out

  f.defvjp(fwd, lambda out, g: (g * out,))
  return f


@pytest.mark.parametrize("name", sorted(
    __import__("cpt_jax.model.transformer", fromlist=["x"]).CUDNN_ATTENTION_FWD))
def test_dots_no_batch_attention_keeps_the_attention_forward(name):
  """The loss and its gradient, as a train step asks for them: under `dots_no_batch` the
  backward runs an attention-like forward kernel again; under `dots_no_batch_attention` its
  output is kept (one kernel, not two), for the primitives named as cuDNN's forward is."""
  from cpt_jax.model.transformer import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
  attn = _attention_like(name)
  x, w = jnp.ones((4, 8)), jnp.ones((8, 8)) * 0.1

  def kernels(policy):
    layer = jax.checkpoint(lambda x, w: attn(x @ w) @ w, policy=REMAT_POLICIES[policy])
    grad = jax.jit(jax.value_and_grad(lambda x, w: layer(x, w).sum(), argnums=1))
    return grad.lower(x, w).as_text().count("stablehlo.sine")

  assert kernels("dots_no_batch") == 2
  assert kernels("dots_no_batch_attention") == 1


def test_cudnn_attention_forward_primitives_carry_the_names_the_policy_keeps():
  """The installed JAX names cuDNN attention's forward primitives as
  CUDNN_ATTENTION_FWD says (a JAX upgrade that renames them fails here, not silently)."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  from cpt_jax.model.transformer import CUDNN_ATTENTION_FWD  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  assert {fa._dot_product_attention_fwd_p_wrapper.name,
          fa._dot_product_attention_fwd_p.name} == set(CUDNN_ATTENTION_FWD)


def test_bf16_compute_keeps_f32_params():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  model, params = _init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out = model.apply({"params": params}, jnp.ones((1, 8), jnp.int32))
  assert out.dtype == jnp.bfloat16


def test_tied_embeddings_and_qkv_bias():
  cfg = dataclasses.replace(CFG, tie_embeddings=True, qkv_bias=True)
  model, params = _init(cfg)
  assert "lm_head" not in params
  assert params["layers_0"]["attn"]["q"]["bias"].shape == (4, 8)
  assert model.apply({"params": params}, jnp.ones((1, 8), jnp.int32)).shape == (1, 8, 61)


def test_every_param_has_logical_axes():
  model = Transformer(CFG)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32)))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: hasattr(x, "names"))
  assert leaves and all(len(x.names) == len(x.value.shape) for x in leaves)


def test_rope_relative():
  """Rotary scores depend on the position difference only."""
  e = 8
  q = jnp.asarray(np.random.default_rng(4).normal(size=(1, 1, 1, e)), jnp.float32)
  k = jnp.asarray(np.random.default_rng(5).normal(size=(1, 1, 1, e)), jnp.float32)

  def score(pq, pk):
    sq, cq = rope.sin_cos(jnp.asarray([[pq]]), e, CFG)
    sk, ck = rope.sin_cos(jnp.asarray([[pk]]), e, CFG)
    return float(jnp.sum(rope.apply(q, sq, cq) * rope.apply(k, sk, ck)))

  assert abs(score(5, 2) - score(13, 10)) < 1e-4
  assert abs(score(5, 2) - score(5, 4)) > 1e-4


def test_llama3_rope_scaling_changes_low_frequencies_only():
  cfg = dataclasses.replace(CFG, rope_scaling="llama3", rope_scaling_factor=8.0,
                            rope_original_max_len=64, rope_theta=500000.0)
  base = rope.inverse_frequencies(64, dataclasses.replace(cfg, rope_scaling=""))
  scaled = rope.inverse_frequencies(64, cfg)
  assert scaled[0] == pytest.approx(base[0])
  assert scaled[-1] == pytest.approx(base[-1] / 8.0)


def test_flops_count():
  assert matmul_params(CFG) == 2 * (32 * 8 * 12 + 3 * 32 * 64) + 32 * 61
  assert flops_per_token(CFG, 16) == 3 * (2 * matmul_params(CFG) + 4 * 2 * 16 * 32)


def test_dot_product_attention_matches_native_on_packed_rows():
  """model.attention='dot_product' (jax.nn.dot_product_attention; 'cudnn' is the same call
  with cuDNN's kernel) gives the native logits and gradients, GQA and segments included."""
  model, params = _init(CFG)
  other = Transformer(dataclasses.replace(CFG, attention="dot_product"))
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(1, CFG.vocab_size, size=(2, 24)))
  seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 9 + [3] * 5], 2, axis=0))
  pos = jnp.asarray(np.repeat([list(range(10)) + list(range(9)) + list(range(5))], 2, axis=0))
  run = lambda m, p: m.apply({"params": p}, tokens, seg, pos)
  np.testing.assert_allclose(run(other, params), run(model, params), atol=2e-5)
  loss = lambda m: jax.grad(lambda p: jnp.sum(jnp.square(run(m, p))))(params)
  for a, b in zip(jax.tree.leaves(loss(other)), jax.tree.leaves(loss(model))):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
