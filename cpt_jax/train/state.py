"""Train state, its sharded initialisation and its abstract (shape-only) form."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cpt_jax.parallel import sharding as shd


@flax.struct.dataclass
class TrainState:
  """Everything the jitted step reads and writes.

  step: scalar int32; params: the trained params (the layout's, train/layout.py); opt_state: optimizer state of
  the trainable parameters; frozen: non-trained trees the objective needs
  (e.g. {'teacher': params of the stage's starting model}), or {}.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  frozen: Any = flax.struct.field(default_factory=dict)


def abstract_boxed_params(model: nn.Module, seq_len: int) -> Any:
  """Shape-only params with their logical-axis boxes."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]


def state_shardings(model: nn.Module, layout: Any, mesh: Mesh, rules, seq_len: int,
                    frozen_keys: tuple[str, ...] = ()) -> TrainState:
  """NamedShardings for every leaf of the TrainState.

  params are the layout's (train/layout.py); frozen trees shard like the model's params.
  """
  boxed = abstract_boxed_params(model, seq_len)
  model_sh = shd.logical_shardings(boxed, mesh, rules)
  rep = shd.replicated(mesh)
  trained_boxed = layout.boxed(boxed)
  param_sh = shd.logical_shardings(trained_boxed, mesh, rules)
  abstract_opt = jax.eval_shape(layout.tx.init, nn.unbox(trained_boxed))
  return TrainState(step=rep, params=param_sh,
                    opt_state=layout.opt_shardings(abstract_opt, param_sh, rep),
                    frozen={k: model_sh for k in frozen_keys})


def abstract_state(model, layout: Any, shardings: TrainState, seq_len: int,
                   frozen_keys: tuple[str, ...] = ()) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the TrainState, for restoring."""
  boxed = abstract_boxed_params(model, seq_len)
  params = nn.unbox(layout.boxed(boxed))
  shape = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     opt_state=jax.eval_shape(layout.tx.init, params),
                     frozen={k: nn.unbox(boxed) for k in frozen_keys})
  shardings = shardings.replace(frozen={k: shardings.frozen[k] for k in frozen_keys})
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape, shardings)


def init_state(model: nn.Module, layout: Any, shardings: TrainState, seed: int,
               seq_len: int) -> TrainState:
  """Initialises params and optimizer state directly in their sharded layout."""

  def init(rng):
    model_params = nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])
    params = layout.init(model_params, jax.random.fold_in(rng, 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=layout.tx.init(params), frozen={})

  out_sh = shardings.replace(frozen={})
  return jax.jit(init, out_shardings=out_sh)(jax.random.key(seed))


def with_params(model_params: Any, layout: Any, shardings: TrainState,
                seed: int = 0) -> TrainState:
  """A fresh state (step 0, new optimizer state) around given model params (warm start);
  the layout adds what it trains besides them (a fresh tau)."""
  out_sh = shardings.replace(frozen={})

  def build(p):
    p = layout.init(p, jax.random.fold_in(jax.random.key(seed), 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=layout.tx.init(p),
                      frozen={})

  return jax.jit(build, out_shardings=out_sh)(model_params)
