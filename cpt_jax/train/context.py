"""What a run builds before its first step: mesh, model, parameter layout, shardings.

`build_context(config)` validates the config and builds the `RunContext` the loop,
evaluation, replay scoring and the benchmarks share; `default_frozen` makes the
frozen trees of a fresh start (the teacher, EWC's Fisher).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cpt_jax import config as config_lib
from cpt_jax.model import hf
from cpt_jax.model.transformer import ModelConfig, Transformer, residual_streams
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import checkpoint as ckpt_lib
from cpt_jax.train import decomposition as decomp_lib
from cpt_jax.train import regularizers
from cpt_jax.train import state as state_lib


@dataclasses.dataclass
class RunContext:
  """What a run builds before its first step (also used by eval and benchmarks)."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: tuple
  model_cfg: ModelConfig
  model: Transformer
  layout: Any  # the trained params' layout: layout.Plain or decomposition.SigmaTau
  state_sh: state_lib.TrainState
  model_sh: Any  # shardings of model-shaped params (teacher, Fisher, warm starts)
  frozen_keys: tuple[str, ...]

  def apply_fn(self, model_params, inputs, segment_ids, positions):
    """logits [B, L, V] of the model on model-shaped params."""
    return self.model.apply({"params": model_params}, inputs, segment_ids, positions)

  def features_fn(self, model_params, inputs, segment_ids, positions):
    """(logits [B, L, V], every block's output [K, B, L, D]) of the model."""
    logits, state = self.model.apply({"params": model_params}, inputs, segment_ids,
                                     positions, mutable=["intermediates"])
    return logits, residual_streams(state["intermediates"], self.model_cfg.num_layers)

  def model_params(self, params):
    """The model's params from the trained ones (sigma + tau merged when decomposed)."""
    return self.layout.merge(params)

  @property
  def tx(self):
    return self.layout.tx

  @property
  def schedule(self) -> Callable:
    return self.layout.schedule


def needs_teacher(obj_cfg) -> bool:
  return (obj_cfg.lambda_kd > 0 or obj_cfg.replay_kd > 0 or obj_cfg.l2sp > 0
          or obj_cfg.ewc > 0)


def build_context(config: ml_collections.ConfigDict, devices=None) -> RunContext:
  """Validates the config and builds mesh, model, optimizer and shardings."""
  devices = jax.devices() if devices is None else devices
  config_lib.validate_config(config, len(devices), jax.process_count())
  mesh = shd.make_mesh(config.sharding.mesh_shape, devices)
  rules = shd.rules_from_config(config.sharding.logical_axis_rules)
  model_cfg = ModelConfig.from_config(config.model)
  model = Transformer(model_cfg)
  boxed = state_lib.abstract_boxed_params(model, config.data.seq_len)
  layout = decomp_lib.make_layout(config, boxed)  # plain, or sigma / tau
  frozen_keys = ("teacher",) if needs_teacher(config.objective) else ()
  if config.objective.ewc > 0:
    frozen_keys += ("fisher",)
  state_sh = state_lib.state_shardings(model, layout, mesh, rules, config.data.seq_len,
                                       frozen_keys)
  model_sh = shd.logical_shardings(boxed, mesh, rules)
  return RunContext(config, mesh, rules, model_cfg, model, layout, state_sh, model_sh,
                    frozen_keys)


def default_frozen(ctx: RunContext, params, pipeline) -> dict:
  """The teacher is the stage's starting params; EWC adds a Fisher from the old domains."""
  params = ctx.model_params(params)  # the starting model (sigma + fresh tau = sigma)
  frozen = {"teacher": jax.tree.map(jnp.copy, params)}
  if "fisher" in ctx.frozen_keys:
    old = [d for d, r in zip(pipeline.domains, pipeline.roles) if r in ("replay", "distill")]
    if not old:
      raise ValueError("objective.ewc > 0 needs old-domain data: set data.replay or data.distill")
    frozen["fisher"] = regularizers.estimate_fisher(  # its FLOPs: Trainer._usage
        ctx, params, pipeline, old, regularizers.fisher_rows(ctx.config), ctx.config.seed)
  return frozen


def starting_params(ctx: RunContext) -> tuple[Any, str]:
  """(model-shaped params the stage starts from, how); params None for a random init.

  From train.init_checkpoint (a decomposed source is merged) or
  train.init_from_hf; the random init is the seed's (`state.init_state`).
  """
  c = ctx.config
  if c.train.init_checkpoint:
    boxed = state_lib.abstract_boxed_params(ctx.model, c.data.seq_len)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            nn.unbox(boxed), ctx.model_sh)
    # A decomposed source checkpoint (sigma + tau) is merged into model params.
    params = ckpt_lib.restore_merged_params(c.train.init_checkpoint, abstract, boxed,
                                            ctx.mesh, ctx.rules, model_config=c.model)
    return params, f"warm start from {c.train.init_checkpoint}"
  if c.train.init_from_hf:
    params = hf.load_hf_params(c.train.init_from_hf, ctx.model_cfg, ctx.model_sh)
    return params, f"warm start from Hugging Face model {c.train.init_from_hf}"
  return None, "random init"


def reference_params(ctx: RunContext, state: Any = None) -> Any:
  """The stage's starting model M, model-shaped: the kept teacher of `state` (copied: the
  step donates the whole state, frozen trees included), else rebuilt as at the start."""
  if state is not None and state.frozen and "teacher" in state.frozen:
    return jax.tree.map(jnp.copy, state.frozen["teacher"])  # model-shaped already
  params, _ = starting_params(ctx)
  if params is not None:
    return params
  c = ctx.config  # random init: rebuilt from the seed
  return ctx.model_params(state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, c.seed,
                                               c.data.seq_len).params)
