"""Train state, its sharded initialisation and its abstract (shape-only) form."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cpt_jax.parallel import sharding as shd
from cpt_jax.train import decomposition


@flax.struct.dataclass
class TrainState:
  """Everything the jitted step reads and writes.

  step: scalar int32; params: model parameters; opt_state: optimizer state of
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


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    rules, seq_len: int, frozen_keys: tuple[str, ...] = (),
                    decomp: Any = None) -> TrainState:
  """NamedShardings for every leaf of the TrainState (frozen trees shard like params).

  With `decomp` (sigma / tau, see decomposition.py) params are {'sigma', 'tau'} and
  frozen trees shard like the model params (= sigma).
  """
  boxed = abstract_boxed_params(model, seq_len)
  model_sh = shd.logical_shardings(boxed, mesh, rules)
  rep = shd.replicated(mesh)
  if decomp is None:
    param_sh = model_sh
    abstract_params = nn.unbox(boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: rep)
  else:
    boxed_params = decomp.boxed_params(boxed)
    param_sh = shd.logical_shardings(boxed_params, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, nn.unbox(boxed_params))
    opt_sh = decomposition.opt_state_shardings(abstract_opt, param_sh, rep)
  return TrainState(step=rep, params=param_sh, opt_state=opt_sh,
                    frozen={k: model_sh for k in frozen_keys})


def abstract_state(model, tx, shardings: TrainState, seq_len: int,
                   frozen_keys: tuple[str, ...] = (), decomp: Any = None) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the TrainState, for restoring."""
  boxed = abstract_boxed_params(model, seq_len)
  model_params = nn.unbox(boxed)
  params = model_params if decomp is None else nn.unbox(decomp.boxed_params(boxed))
  shape = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     opt_state=jax.eval_shape(tx.init, params),
                     frozen={k: model_params for k in frozen_keys})
  shardings = shardings.replace(frozen={k: shardings.frozen[k] for k in frozen_keys})
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape, shardings)


def init_state(model: nn.Module, tx: optax.GradientTransformation, shardings: TrainState,
               seed: int, seq_len: int, decomp: Any = None) -> TrainState:
  """Initialises params and optimizer state directly in their sharded layout."""

  def init(rng):
    params = nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])
    if decomp is not None:
      params = decomp.init(params, jax.random.fold_in(rng, 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), frozen={})

  out_sh = shardings.replace(frozen={})
  return jax.jit(init, out_shardings=out_sh)(jax.random.key(seed))


def with_params(params: Any, tx: optax.GradientTransformation,
                shardings: TrainState, decomp: Any = None, seed: int = 0) -> TrainState:
  """A fresh state (step 0, new optimizer state) around given params (warm start).

  With `decomp`, model-shaped params become sigma and tau starts fresh.
  """
  out_sh = shardings.replace(frozen={})

  def build(p):
    if decomp is not None:
      p = decomp.init(p, jax.random.fold_in(jax.random.key(seed), 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), frozen={})

  return jax.jit(build, out_shardings=out_sh)(params)


def param_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def param_count(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
