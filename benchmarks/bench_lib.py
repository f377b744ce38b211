"""Step builders, timers and compiled-memory figures shared by the benchmarks (not part of
the package): throughput.py, memory.py and input_pipeline.py."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cpt_jax import batch as batch_lib
from cpt_jax import config as config_lib
from cpt_jax.model.transformer import flops_per_token
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import context as context_lib
from cpt_jax.train import objective, state as state_lib, step as step_lib

# A KD benchmark has a random teacher (the starting model's params at init); validation
# only asks that a starting model is named.
RANDOM_TEACHER = "<benchmark: the random init is the teacher>"


def throughput_config() -> ml_collections.ConfigDict:
  """The headline benchmark shape: d_model 256, 4 layers, seq 256, batch 16, f32, bytes."""
  c = config_lib.default_config()
  c.model.update(d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=1024)
  c.data.seq_len = 256
  c.data.new = "synthetic"
  c.train.global_batch_size = 16
  c.sharding.mesh_shape = (-1, 1, 1)
  return c


def with_teacher(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` may use a teacher (KD, L2-SP) without a checkpoint: the random init is it."""
  if context_lib.needs_teacher(config.objective) and not config.train.init_from_hf:
    config.train.init_checkpoint = config.train.init_checkpoint or RANDOM_TEACHER
  return config


def roles_for(batch_size: int, share: float, role: int) -> np.ndarray:
  """[B] roles: the last round(share * B) rows (at least one if share > 0) have `role`."""
  n = 0 if share <= 0 else max(1, int(round(share * batch_size)))
  roles = np.full((batch_size,), batch_lib.NEW, np.int32)
  roles[batch_size - n:] = role
  return roles


@dataclasses.dataclass
class Bench:
  """One compiled step with its own state and batch (the state is donated each call)."""

  ctx: context_lib.RunContext
  compiled: Any  # the ahead-of-time compiled step: its memory_analysis(), cost_analysis()
  state: Any
  batch: dict
  tokens: int  # tokens per step
  model_flops: float  # model FLOPs of one plain training step on these tokens
  compile_seconds: float

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, m = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, m))
    return (time.perf_counter() - t0) / steps

  def memory(self) -> dict:
    """Per-device bytes of the compiled step (`memory_bytes`)."""
    return memory_bytes(self.compiled)

  def hlo_flops(self) -> float:
    """FLOPs of the compiled step by XLA's cost analysis (what it runs, remat included)."""
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def _compile(ctx: context_lib.RunContext, config: ml_collections.ConfigDict, state: Any,
             batch: dict) -> tuple[Any, float]:
  """(the train step of `config` compiled for `state` and `batch`, arrays or
  ShapeDtypeStructs with shardings; seconds it took)."""
  loss_fn = objective.make_loss_fn(ctx.apply_fn, config.objective, num_domains=1,
                                   z_loss=config.train.z_loss, layout=ctx.layout,
                                   total_steps=config.train.steps,
                                   features_fn=ctx.features_fn)
  step = step_lib.make_train_step(loss_fn, ctx.layout, config.train.grad_accum_steps)
  jitted = step_lib.jit_train_step(step, ctx.state_sh, ctx.mesh, ctx.rules, tuple(batch))
  t0 = time.perf_counter()
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    compiled = jitted.jitted.lower(state, batch).compile()
  return compiled, time.perf_counter() - t0


def memory_bytes(compiled: Any) -> dict:
  """XLA's per-device `memory_analysis()` of a compiled step; `peak_bytes` = arguments +
  outputs - aliased (the donated state) + temporaries."""
  mem = compiled.memory_analysis()
  arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
          "peak_bytes": arg + out - alias + temp}


def host_batch(config: ml_collections.ConfigDict, roles_B: np.ndarray,
               seed: int = 0, shards: int = 1) -> dict[str, np.ndarray]:
  """A random packed batch with `roles_B`, plus `distill_index` when the objective has a
  teacher that runs on rows (as the trainer builds it)."""
  b, o = config.train.global_batch_size, config.objective
  batch = batch_lib.synthetic_batch(np.random.default_rng(seed), b, config.data.seq_len,
                                    config.model.vocab_size, docs_per_row=1)
  batch["roles"] = np.asarray(roles_B, np.int32)
  if o.lambda_kd > 0 or o.replay_kd > 0:
    idx = step_lib.distill_index(batch["roles"], config.train.grad_accum_steps,
                                 with_replay=o.replay_kd > 0, with_distill=o.lambda_kd > 0,
                                 shards=shards)
    if idx is not None:
      batch["distill_index"] = idx
  return batch


def build_bench(config: ml_collections.ConfigDict, roles_B: np.ndarray | None = None,
                devices=None, seed: int = 0) -> Bench:
  """The real jitted step of `config` (layout, objective, teacher) on one random batch."""
  devices = jax.devices()[:1] if devices is None else devices
  config = with_teacher(config)
  roles_B = roles_for(config.train.global_batch_size, 0, 0) if roles_B is None else roles_B
  ctx = context_lib.build_context(config, devices)
  local = host_batch(config, roles_B, seed, shd.data_parallel_size(ctx.mesh))
  batch = shd.global_batch({k: local[k] for k in batch_lib.FIELDS}, ctx.mesh)
  if "distill_index" in local:
    batch["distill_index"] = step_lib.device_distill_index(local["distill_index"], ctx.mesh)
  state = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, seed, config.data.seq_len)
  if ctx.frozen_keys:
    teacher = jax.jit(ctx.model_params, out_shardings=ctx.model_sh)(state.params)
    state = state.replace(frozen={k: teacher for k in ctx.frozen_keys})
  compiled, compile_s = _compile(ctx, config, state, batch)
  tokens = config.train.global_batch_size * config.data.seq_len
  return Bench(ctx, compiled, state, batch, tokens,
               flops_per_token(ctx.model_cfg, config.data.seq_len) * tokens, compile_s)


def interleaved_times(benches: dict[str, Bench], steps: int, rounds: int) -> dict[str, list]:
  """Seconds per step of each bench, `rounds` times, the benches taking turns each round
  (so a change in machine load falls on all of them); each is compiled and warmed first."""
  for b in benches.values():
    b.run(1)
  times = {k: [] for k in benches}
  for _ in range(rounds):
    for k, b in benches.items():
      times[k].append(b.run(steps))
  return times


def time_train_step(config: ml_collections.ConfigDict, steps: int = 10, repeats: int = 3,
                    devices=None, trace_dir: str = "") -> dict:
  """Median seconds per step of the real jitted step on random packed batches; with
  `trace_dir` two more steps under a `jax.profiler` trace written there (untimed), beside
  the compiled step's HLO text (train_step.hlo.txt)."""
  bench = build_bench(config, devices=devices)
  bench.run(1)
  times = [bench.run(steps) for _ in range(repeats)]
  if trace_dir:  # the compiled module beside the trace: profile_summary.py reads both
    os.makedirs(trace_dir, exist_ok=True)
    with open(os.path.join(trace_dir, "train_step.hlo.txt"), "w", encoding="utf-8") as f:
      f.write(bench.compiled.as_text())
    with jax.profiler.trace(trace_dir):
      bench.run(2)
  sec = float(np.median(times))
  return {"seconds_per_step": sec, "tokens_per_sec": bench.tokens / sec,
          "compile_seconds": bench.compile_seconds, "model_flops_per_step": bench.model_flops,
          "step_times": times}


def train_step_tokens_per_sec(config: ml_collections.ConfigDict | None = None) -> float:
  """Tokens/s of the train step at `config` (default: the throughput shape)."""
  return time_train_step(config or throughput_config(), steps=5, repeats=3)["tokens_per_sec"]


# ------------------------------------------------------------------ compiled memory


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest
  shard of each leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
  return total


def compiled_step_memory(config: ml_collections.ConfigDict, roles_B: np.ndarray | None = None,
                         devices=None) -> dict:
  """Per-device bytes of the compiled train step of `config`, from shapes alone (no
  weights): the state's parts (by their shardings) and `memory_bytes`."""
  devices = jax.devices()[:1] if devices is None else devices
  config = with_teacher(config)
  roles_B = roles_for(config.train.global_batch_size, 0, 0) if roles_B is None else roles_B
  ctx = context_lib.build_context(config, devices)
  local = host_batch(config, roles_B, shards=shd.data_parallel_size(ctx.mesh))
  shardings = step_lib.batch_shardings(ctx.mesh, local)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
           for k, v in local.items()}
  state = state_lib.abstract_state(ctx.model, ctx.layout, ctx.state_sh, config.data.seq_len,
                                   ctx.frozen_keys)
  compiled, compile_s = _compile(ctx, config, state, batch)
  return {
      "devices": len(devices), "mesh": dict(ctx.mesh.shape),
      "params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))),
      "param_bytes": per_device_bytes(state.params),
      "opt_state_bytes": per_device_bytes(state.opt_state),
      "frozen_bytes": {k: per_device_bytes(v) for k, v in state.frozen.items()},
      **memory_bytes(compiled), "compile_seconds": compile_s,
  }
