"""Timing helpers shared by benchmarks/throughput.py and input_pipeline.py (not part of the package)."""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from cpt_jax import batch as batch_lib
from cpt_jax import config as config_lib
from cpt_jax.model.transformer import flops_per_token
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import context as context_lib
from cpt_jax.train import objective, state as state_lib, step as step_lib, trainer


def throughput_config() -> ml_collections.ConfigDict:
  """The headline benchmark shape: d_model 256, 4 layers, seq 256, batch 16, f32, bytes."""
  c = config_lib.default_config()
  c.model.update(d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=1024)
  c.data.seq_len = 256
  c.data.new = "synthetic"
  c.train.global_batch_size = 16
  c.sharding.mesh_shape = (-1, 1, 1)
  return c


def time_train_step(config: ml_collections.ConfigDict, steps: int = 10, repeats: int = 3,
                    devices=None) -> dict:
  """Median seconds per step of the real jitted step on random packed batches."""
  devices = jax.devices()[:1] if devices is None else devices
  ctx = context_lib.build_context(config, devices)
  loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, num_domains=1)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(loss_fn, ctx.layout, config.train.grad_accum_steps),
      ctx.state_sh, ctx.mesh, ctx.rules)
  state = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, 0, config.data.seq_len)
  rng = np.random.default_rng(0)
  batch = shd.global_batch(batch_lib.synthetic_batch(
      rng, config.train.global_batch_size, config.data.seq_len, config.model.vocab_size,
      docs_per_row=1), ctx.mesh)
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch)
    jax.block_until_ready((state, m))
    times.append((time.perf_counter() - t0) / steps)
  sec = float(np.median(times))
  tokens = config.train.global_batch_size * config.data.seq_len
  return {"seconds_per_step": sec, "tokens_per_sec": tokens / sec, "compile_seconds": compile_s,
          "model_flops_per_step": flops_per_token(ctx.model_cfg, config.data.seq_len) * tokens,
          "step_times": times}


def train_step_tokens_per_sec(config: ml_collections.ConfigDict | None = None) -> float:
  """Tokens/s of the train step at `config` (default: the throughput shape)."""
  return time_train_step(config or throughput_config(), steps=5, repeats=3)["tokens_per_sec"]
