r"""Train-step throughput and MFU, against a plain Flax step and a measured matmul peak.

  python benchmarks/throughput.py                 # headline CPU shape (f32)
  python benchmarks/throughput.py --gpt2_small    # d768 x 12 layers, seq 1024, bf16 (GPU)

Prints one JSON object: tokens_per_sec, model_tflops_per_step, peak_gflops (a
2048x2048 matmul in the compute dtype, measured before and after the step
timings in this same run; the higher is used), mfu, the same figures for a
plain Flax step of the same shape (`baseline`), and the rate controllers'
overhead per update as a fraction of the step time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from cpt_jax import batch as batch_lib  # pylint: disable=wrong-import-position
from cpt_jax.model.transformer import flops_per_token, ModelConfig  # pylint: disable=wrong-import-position
from cpt_jax.train import metrics  # pylint: disable=wrong-import-position
import bench_lib as bench  # pylint: disable=wrong-import-position


class PlainBlock(nn.Module):
  """Textbook Flax block of the same shape: RMSNorm, MHA with rotary, SwiGLU."""

  d: int
  heads: int
  mlp: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, pos):
    e = self.d // self.heads
    h = nn.RMSNorm(dtype=self.dtype)(x)
    q, k, v = (nn.DenseGeneral((self.heads, e), use_bias=False, dtype=self.dtype)(h)
               for _ in range(3))
    inv = 1.0 / (10000 ** (jnp.arange(0, e, 2) / e))
    ang = pos[..., None] * inv
    sin, cos = jnp.sin(jnp.concatenate([ang, ang], -1)), jnp.cos(jnp.concatenate([ang, ang], -1))
    rot = lambda t: t * cos[:, :, None] + jnp.concatenate(
        [-t[..., e // 2:], t[..., :e // 2]], -1) * sin[:, :, None]
    q, k = rot(q), rot(k)
    s = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(e)
    l = x.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((l, l), bool)), s, -1e30)
    a = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(s.astype(jnp.float32), -1).astype(
        self.dtype), v)
    x = x + nn.DenseGeneral(self.d, axis=(-2, -1), use_bias=False, dtype=self.dtype)(a)
    h = nn.RMSNorm(dtype=self.dtype)(x)
    g = nn.Dense(self.mlp, use_bias=False, dtype=self.dtype)(h)
    u = nn.Dense(self.mlp, use_bias=False, dtype=self.dtype)(h)
    return x + nn.Dense(self.d, use_bias=False, dtype=self.dtype)(nn.silu(g) * u)


class PlainLM(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    x = nn.Embed(c.vocab_size, c.d_model, dtype=dt)(tokens)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape).astype(jnp.float32)
    for _ in range(c.num_layers):
      x = PlainBlock(c.d_model, c.num_heads, c.mlp_dim, dt)(x, pos)
    return nn.Dense(c.vocab_size, use_bias=False, dtype=dt)(nn.RMSNorm(dtype=dt)(x))


def time_plain_step(model_cfg: ModelConfig, batch_size: int, seq_len: int, steps: int,
                    repeats: int) -> dict:
  """The plain baseline: PlainLM + optax.adamw + mean CE, one device, jit."""
  model = PlainLM(model_cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      1, model_cfg.vocab_size, (batch_size, seq_len)), jnp.int32)
  params = model.init(jax.random.key(0), tokens[:1])
  tx = optax.adamw(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, tokens):
    def loss_fn(p):
      logits = model.apply(p, tokens).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  params, opt, loss = step(params, opt, tokens)
  jax.block_until_ready(loss)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      params, opt, loss = step(params, opt, tokens)
    jax.block_until_ready(loss)
    times.append((time.perf_counter() - t0) / steps)
  sec = float(np.median(times))
  return {"seconds_per_step": sec, "tokens_per_sec": batch_size * seq_len / sec}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--gpt2_small", action="store_true", help="d768 x 12, seq 1024, bf16")
  ap.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--batch", type=int, default=0, help="override the batch size")
  ap.add_argument("--no_baseline", action="store_true")
  ap.add_argument("--attention", default="", help="model.attention (native, dot_product, cudnn)")
  ap.add_argument("--peak_n", type=int, default=0,
                  help="matmul size of the peak (default 2048 on CPU, 8192 elsewhere)")
  args = ap.parse_args()

  config = bench.throughput_config()
  if args.gpt2_small:
    config.model.update(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                        mlp_dim=3072, dtype="bfloat16", vocab_pad_multiple=128)
    config.data.seq_len = 1024
    config.train.global_batch_size = 16
  if args.batch:
    config.train.global_batch_size = args.batch
  if args.attention:
    config.model.attention = args.attention
  dtype = jnp.dtype(config.model.dtype)
  # An accelerator needs a larger product than 2048^3 to reach its peak.
  peak_n = args.peak_n or (2048 if jax.default_backend() == "cpu" else 8192)
  peak_before = metrics.measure_matmul_peak(n=peak_n, dtype=dtype)
  ours = bench.time_train_step(config, steps=args.steps, repeats=args.repeats)
  model_cfg = ModelConfig.from_config(config.model)
  seq, bsz = config.data.seq_len, config.train.global_batch_size
  base = None if args.no_baseline else time_plain_step(model_cfg, bsz, seq, args.steps,
                                                       args.repeats)
  peak_after = metrics.measure_matmul_peak(n=peak_n, dtype=dtype)
  peak = max(peak_before, peak_after)
  flops_step = flops_per_token(model_cfg, seq) * bsz * seq

  from cpt_jax import mixing  # pylint: disable=g-import-not-at-top
  from cpt_jax.schema import mixing as mixing_config  # pylint: disable=g-import-not-at-top
  overhead = {}
  for name in ("doremi", "exp3", "forgetting"):
    mcfg = mixing_config.default_mixing_config()
    mcfg.controller = name
    sec = mixing.controller_overhead_seconds(mcfg, num_domains=200)
    overhead[name] = {"seconds_per_update": sec,
                      "fraction_of_step": sec / ours["seconds_per_step"]}

  out = {
      "device": jax.devices()[0].device_kind, "dtype": str(dtype),
      "attention": model_cfg.attention,
      "shape": {"d_model": model_cfg.d_model, "layers": model_cfg.num_layers,
                "heads": model_cfg.num_heads, "mlp": model_cfg.mlp_dim, "seq": seq,
                "batch": bsz, "vocab": model_cfg.vocab_size},
      "tokens_per_sec": ours["tokens_per_sec"],
      "seconds_per_step": ours["seconds_per_step"],
      "step_times": ours["step_times"],
      "compile_seconds": ours["compile_seconds"],
      "model_tflops_per_step": flops_step / 1e12,
      "peak_gflops": peak / 1e9, "peak_matmul_n": peak_n,
      "peak_gflops_before_after": [peak_before / 1e9, peak_after / 1e9],
      "mfu": flops_step / ours["seconds_per_step"] / peak,
      "controller_overhead_200_domains": overhead,
  }
  if base is not None:
    out["baseline"] = {"tokens_per_sec": base["tokens_per_sec"],
                       "mfu": flops_step / base["seconds_per_step"] / peak}
    out["speedup_vs_baseline"] = ours["tokens_per_sec"] / base["tokens_per_sec"]
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
