"""sigma / tau parameter decomposition with gradient routing (config group `decomposition`).

The model's parameters theta are split into sigma (the base model, always the
full model tree) and tau (a per-stage delta on some of its leaves):

  mode='lora'     tau[path] = {'lora_a': A [in..., r], 'lora_b': B [r, out...]} for every
                  leaf whose path (e.g. 'layers_0/attn/q/kernel') matches
                  `decomposition.targets`; delta = (alpha / r) * A @ B, B = 0 at init,
                  A ~ N(0, 1/fan_in). Input axes: all but the last for kernels that write
                  into the residual stream (logical name 'embed' last, e.g. attn/o
                  [H, E, D]), else the first. Stacked (scan_layers) kernels keep their
                  leading 'layers' axis on A and B.
  mode='subtree'  tau[path] = a full-shape delta (zeros at init) for every leaf whose path
                  matches `targets`; those leaves of sigma are frozen (no gradient use, no
                  optimizer state), so the sub-trees train only through tau.

  effective params W = sigma + delta(tau)          (`merge_tau`; pure, used inside the loss)
  state.params = {'sigma': model params, 'tau': tau tree}

Keeping tau a *delta* on a full sigma makes three things trivial: B = 0 / delta = 0 leaves
the model unchanged, "the model without this stage's tau" is just `params['sigma']`, and
export is `merge_tau(params)` (a plain model tree for `save_hf`).

Gradient routing (`routing=True`), inside one jitted step. The objective returns its loss
split by signal, loss_TD = [loss_T, loss_D]: T = CE (+ z-loss) on `new` rows; D = CE on
`replay` rows, KL on `distill` rows, L2-SP / EWC (which act on sigma alone, anchored at the
stage's starting model). One forward is traced with `jax.vjp`; its vjp function is called
twice, with cotangents [1, 0] (kept: tau's gradient) and [0, 1] (kept: sigma's gradient).
Each call is a backward pass, but XLA drops what is not kept: the T pass computes the
activation cotangents and tau's (small) weight gradients only, never sigma's weight
gradients, so the cost is about fwd + bwd + activation-bwd (~1.33x a plain step), not 2x.
Rows never interact in the forward (attention is within a row), so this is exactly
grad_sigma = d loss_D / d sigma and grad_tau = d loss_T / d tau. With `freeze_sigma` only the
T pass (or, without routing, the full loss) is taken, and sigma gets neither a gradient nor
optimizer state. With `routing=False` both groups follow the full loss (one pass).

Optimizers: one per group (sigma: `config.optimizer`; tau: the same with the
`decomposition.tau_*` overrides), each with its own clipping, schedule and weight decay;
opt_state = {'sigma': ..., 'tau': ...}, with no 'sigma' entry when sigma is frozen.

"Exactly zero update". A group's gradient is exactly zero when the step has no rows of its
signal (routing makes loss_D identically 0 on a new-only batch, etc.), but AdamW would
still move it (momentum from earlier steps, weight decay). With `skip_idle_updates` (the
default) a group whose signal is absent in the step gets an update of exactly 0 (its
moments see a zero gradient and its step count advances, so schedules stay on the global
step). Signal: T = any `new` tokens; D = any `replay` tokens (lambda_replay > 0), any
distill tokens under KD, or L2-SP / EWC switched on. Without routing: either.

Stages: a stage with `decomposition.mode` set starts a fresh tau on top of the params it
warm-starts from; a decomposed source checkpoint (an earlier stage's sigma + tau) is merged
first, so each stage's sigma is the full model the previous stage ended with
(`checkpoint.restore_merged_params`). The trainer evaluates every domain with and without the stage's
tau (summary `eval_without_tau`) and reports parameter / optimizer-state bytes per group
(summary `state_bytes`, metrics `state_bytes`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpt_jax import batch as batch_lib
from cpt_jax.schema.decomposition import MODES
from cpt_jax.train import optimizer as optimizer_lib

GROUPS = ("sigma", "tau")


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def path_str(path) -> str:
  """'layers_0/attn/q/kernel' from a jax key path."""
  return "/".join(_key_name(k) for k in path)


def is_decomposed(params: Any) -> bool:
  """True for a {'sigma', 'tau'} params tree (model trees never have these top-level keys)."""
  return isinstance(params, dict) and set(params.keys()) == set(GROUPS)


def _set_nested(tree: dict, keys: tuple[str, ...], value: Any) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def _get_nested(tree: Any, keys: tuple[str, ...]) -> Any:
  for k in keys:
    tree = tree[k]
  return tree


@dataclasses.dataclass(frozen=True)
class TauSpec:
  """One tau entry: the sigma leaf it modifies and (LoRA) how its axes split."""

  keys: tuple[str, ...]  # path of the sigma leaf
  shape: tuple[int, ...]  # sigma leaf shape
  names: tuple[Any, ...] | None  # logical axis names of the sigma leaf
  stacked: bool  # leading 'layers' axis (scan_layers)
  in_ndim: int  # LoRA: number of input axes (after the layers axis)


@dataclasses.dataclass(frozen=True)
class Decomposition:
  """The static description of a run's sigma / tau split (built by `build`)."""

  mode: str
  targets: str
  rank: int
  alpha: float
  routing: bool
  freeze_sigma: bool
  skip_idle_updates: bool
  specs: tuple[TauSpec, ...]
  signal_d_always: bool = False  # L2-SP / EWC: sigma has a D signal every step
  lambda_replay: float = 1.0
  lambda_kd: float = 0.0
  replay_kd: float = 0.0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def trainable_groups(self) -> tuple[str, ...]:
    return ("tau",) if self.freeze_sigma else GROUPS

  # ---------------------------------------------------------------- tau tree
  def boxed_tau(self) -> dict:
    """Shape-only tau with logical-axis boxes (for shardings)."""
    out: dict = {}
    for s in self.specs:
      if self.mode == "subtree":
        leaf = _box(jax.ShapeDtypeStruct(s.shape, jnp.float32), s.names)
      else:
        a_shape, b_shape, a_names, b_names = self._lora_shapes(s)
        leaf = {"lora_a": _box(jax.ShapeDtypeStruct(a_shape, jnp.float32), a_names),
                "lora_b": _box(jax.ShapeDtypeStruct(b_shape, jnp.float32), b_names)}
      _set_nested(out, s.keys, leaf)
    return out

  def boxed_params(self, model_boxed: Any) -> dict:
    return {"sigma": model_boxed, "tau": self.boxed_tau()}

  def _lora_shapes(self, s: TauSpec):
    lead = s.shape[:1] if s.stacked else ()
    core = s.shape[1:] if s.stacked else s.shape
    a_shape = lead + core[:s.in_ndim] + (self.rank,)
    b_shape = lead + (self.rank,) + core[s.in_ndim:]
    if s.names is None:
      return a_shape, b_shape, None, None
    nl = s.names[:1] if s.stacked else ()
    nc = s.names[1:] if s.stacked else s.names
    return (a_shape, b_shape, nl + tuple(nc[:s.in_ndim]) + ("lora_rank",),
            nl + ("lora_rank",) + tuple(nc[s.in_ndim:]))

  def init_tau(self, rng: jax.Array) -> dict:
    """A fresh tau: B = 0 and A ~ N(0, 1/fan_in) (LoRA), or zero deltas (subtree)."""
    out: dict = {}
    for i, s in enumerate(self.specs):
      if self.mode == "subtree":
        leaf = jnp.zeros(s.shape, jnp.float32)
      else:
        a_shape, b_shape, _, _ = self._lora_shapes(s)
        fan_in = int(np.prod(s.shape[1 if s.stacked else 0:][:s.in_ndim]))
        a = jax.random.normal(jax.random.fold_in(rng, i), a_shape, jnp.float32)
        leaf = {"lora_a": a / math.sqrt(fan_in), "lora_b": jnp.zeros(b_shape, jnp.float32)}
      _set_nested(out, s.keys, leaf)
    return out

  def init(self, model_params: Any, rng: jax.Array) -> dict:
    """{'sigma': model_params, 'tau': fresh tau} (jit-safe)."""
    return {"sigma": model_params, "tau": self.init_tau(rng)}

  # ---------------------------------------------------------------- merge
  def delta(self, tau_leaf: Any, sigma_leaf: jax.Array) -> jax.Array:
    if self.mode == "subtree":
      return tau_leaf
    return lora_delta(tau_leaf["lora_a"], tau_leaf["lora_b"], self.scale, sigma_leaf.ndim)

  def merge(self, params: Any) -> Any:
    """Model params W = sigma + delta(tau) (a model-shaped tree; pure and jit-safe)."""
    if not is_decomposed(params):
      return params
    out = jax.tree.map(lambda x: x, params["sigma"])  # shallow copy of the dict structure
    for s in self.specs:
      w = _get_nested(params["sigma"], s.keys)
      d = self.delta(_get_nested(params["tau"], s.keys), w)
      _set_nested(out, s.keys, (w + d.astype(w.dtype)))
    return out

  def without_tau(self, params: Any) -> Any:
    """The model without this stage's tau: sigma itself."""
    return params["sigma"] if is_decomposed(params) else params

  def sigma_of(self, params: Any) -> Any:
    return params["sigma"]

  def sigma_labels(self, sigma: Any) -> Any:
    """'train' / 'frozen' per sigma leaf (subtree mode freezes the base of tau's leaves)."""
    frozen = {s.keys for s in self.specs} if self.mode == "subtree" else set()
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if tuple(_key_name(k) for k in p) in frozen else "train", sigma)

  # ---------------------------------------------------------------- signals
  def signals(self, aux: dict) -> dict[str, jax.Array]:
    """Whether each group has a gradient signal this step (see the module docstring)."""
    role_tok = aux["role_tokens"]
    t = role_tok[batch_lib.NEW] > 0
    d = jnp.asarray(self.signal_d_always)
    if self.lambda_replay > 0 or self.replay_kd > 0:
      d = d | (role_tok[batch_lib.REPLAY] > 0)
    if self.lambda_kd > 0 and "kd_tokens" in aux:
      d = d | (aux["kd_tokens"] > 0)
    if not self.routing:
      t = d = t | d
    return {"sigma": d, "tau": t}


def _box(value, names):
  return value if names is None else nn.Partitioned(value, names=tuple(names))


def lora_delta(a: jax.Array, b: jax.Array, scale: float, w_ndim: int) -> jax.Array:
  """scale * A @ B over the rank axis: A [(Ly,) in..., r], B [(Ly,) r, out...]."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  if a.ndim + b.ndim - 2 == w_ndim:
    return scale * jnp.tensordot(a, b, axes=1)
  return scale * jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)  # stacked layers


def _lora_in_ndim(names, stacked: bool, ndim: int) -> int:
  core = (names[1:] if stacked else names) if names is not None else None
  core_ndim = ndim - (1 if stacked else 0)
  if core is not None and core_ndim >= 2 and core[-1] == "embed":
    return core_ndim - 1  # writes into the residual stream: every other axis is input
  return 1


def build(config: Any, model_boxed: Any) -> Decomposition | None:
  """The run's Decomposition from `config.decomposition` (None when mode is '')."""
  dc = config.decomposition
  if not dc.mode:
    return None
  if dc.mode not in MODES:
    raise ValueError(f"decomposition.mode={dc.mode!r}; expected one of {MODES}")
  pattern = re.compile(dc.targets)
  specs = []
  flat, _ = jax.tree_util.tree_flatten_with_path(
      model_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in flat:
    name = path_str(path)
    if not pattern.search(name):
      continue
    names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    shape = tuple(value.shape)
    stacked = bool(names) and names[0] == "layers"
    if dc.mode == "lora" and len(shape) - int(stacked) < 2:
      raise ValueError(f"decomposition.targets={dc.targets!r} matches {name} {shape}, which is "
                       "not a matrix; LoRA needs kernels (e.g. 'attn/(q|v)/kernel')")
    specs.append(TauSpec(tuple(_key_name(k) for k in path), shape, names, stacked,
                         _lora_in_ndim(names, stacked, len(shape))))
  if not specs:
    raise ValueError(f"decomposition.targets={dc.targets!r} matches no parameter path")
  if dc.mode == "lora" and dc.lora_rank < 1:
    raise ValueError(f"decomposition.lora_rank={dc.lora_rank} must be >= 1")
  o = config.objective
  return Decomposition(
      mode=dc.mode, targets=dc.targets, rank=int(dc.lora_rank), alpha=float(dc.lora_alpha),
      routing=bool(dc.routing), freeze_sigma=bool(dc.freeze_sigma),
      skip_idle_updates=bool(dc.skip_idle_updates), specs=tuple(specs),
      signal_d_always=bool(o.l2sp > 0 or o.ewc > 0), lambda_replay=float(o.lambda_replay),
      lambda_kd=float(o.lambda_kd), replay_kd=float(o.replay_kd))


def merge_tau(params: Any, decomp: Decomposition | None) -> Any:
  """Model params for export / evaluation: sigma + tau's delta (identity without tau)."""
  if decomp is None or not is_decomposed(params):
    return params
  return decomp.merge(params)


# ------------------------------------------------------------------ optimizers


def tau_optimizer_config(opt_cfg: Any, dc: Any) -> Any:
  """`config.optimizer` with the `decomposition.tau_*` overrides laid over it."""
  out = copy.deepcopy(opt_cfg)
  if dc.tau_lr >= 0:
    out.lr = dc.tau_lr
  if dc.tau_schedule:
    out.schedule = dc.tau_schedule
  if dc.tau_warmup_steps >= 0:
    out.warmup_steps = dc.tau_warmup_steps
  if dc.tau_weight_decay >= 0:
    out.weight_decay = dc.tau_weight_decay
  return out


class GroupOptimizer:
  """One optax transformation per trainable group; state {group: state}.

  Only trainable groups have an entry, so a frozen sigma has no optimizer state at all.
  `update` is the plain optax interface (no routing signals); the train step uses
  `make_apply_fn`, which also honours `skip_idle_updates`.
  """

  def __init__(self, txs: dict[str, optax.GradientTransformation], schedules: dict):
    self.txs = txs
    self.schedules = schedules

  def init(self, params):
    return {g: tx.init(params[g]) for g, tx in self.txs.items()}

  def update(self, grads, state, params=None):
    updates, new_state = {}, {}
    for g, tx in self.txs.items():
      updates[g], new_state[g] = tx.update(grads[g], state[g],
                                           None if params is None else params[g])
    for g in params or {}:
      if g not in updates:
        updates[g] = jax.tree.map(jnp.zeros_like, params[g])
    return updates, new_state


def make_optimizer(decomp: Decomposition, config: Any) -> tuple[GroupOptimizer, Callable]:
  """(tx, sigma's schedule); tau's optimizer uses `tau_optimizer_config`."""
  total = config.train.steps
  txs, schedules = {}, {}
  tau_tx, schedules["tau"] = optimizer_lib.make_optimizer(
      tau_optimizer_config(config.optimizer, config.decomposition), total)
  sigma_tx, schedules["sigma"] = optimizer_lib.make_optimizer(config.optimizer, total)
  if not decomp.freeze_sigma:
    if decomp.mode == "subtree":
      sigma_tx = optax.multi_transform({"train": sigma_tx, "frozen": optax.set_to_zero()},
                                       decomp.sigma_labels)
    txs["sigma"] = sigma_tx
  txs["tau"] = tau_tx
  return GroupOptimizer(txs, schedules), schedules["sigma"]


def opt_state_shardings(abstract_opt: Any, param_sh: dict, rep: Any) -> Any:
  """Shardings of the per-group optimizer state.

  Every optimizer-state leaf that mirrors a parameter (Adam moments) sits under the
  group key and ends in that parameter's path; it gets the parameter's sharding. Other
  leaves (counts) are replicated.
  """
  by_group = {}
  for g, sh in param_sh.items():
    flat, _ = jax.tree_util.tree_flatten_with_path(sh)
    by_group[g] = {tuple(_key_name(k) for k in p): s for p, s in flat}

  def leaf(path, x):
    keys = tuple(_key_name(k) for k in path)
    table = by_group.get(keys[0], {})
    for n in range(len(keys) - 1, 0, -1):
      s = table.get(keys[-n:])
      if s is not None and len(s.spec) <= len(x.shape):
        return s
    return rep

  return jax.tree_util.tree_map_with_path(leaf, abstract_opt)


# ------------------------------------------------------------------ train step hooks


def make_grads_fn(decomp: Decomposition) -> Callable:
  """grads_fn(loss_fn, params, batch, frozen) -> (grads {group: tree}, aux).

  `loss_fn` returns loss_TD = [loss_T, loss_D] (see objective.make_loss_fn with decomp).
  """
  groups = decomp.trainable_groups

  def grads_fn(loss_fn, params, batch, frozen):
    trainable = {g: params[g] for g in groups}

    def f(tr):
      return loss_fn({**params, **tr}, batch, frozen)

    _, vjp_fn, aux = jax.vjp(f, trainable, has_aux=True)
    if not decomp.routing:
      (g,) = vjp_fn(jnp.ones((2,), jnp.float32))
      return g, aux
    (g_t,) = vjp_fn(jnp.asarray([1.0, 0.0], jnp.float32))
    grads = {"tau": g_t["tau"]}
    if "sigma" in groups:
      (g_d,) = vjp_fn(jnp.asarray([0.0, 1.0], jnp.float32))
      grads["sigma"] = g_d["sigma"]
    return grads, aux

  return grads_fn


def make_apply_fn(decomp: Decomposition, tx: GroupOptimizer) -> Callable:
  """apply_fn(grads, state, aux) -> (params, opt_state, metrics): per-group updates."""

  def apply_fn(grads, state, aux):
    signals = decomp.signals(aux)
    params, opt_state, metrics = dict(state.params), {}, {}
    for g, gtx in tx.txs.items():
      updates, opt_state[g] = gtx.update(grads[g], state.opt_state[g], state.params[g])
      if decomp.skip_idle_updates:
        updates = jax.tree.map(lambda u, s=signals[g]: jnp.where(s, u, jnp.zeros_like(u)),
                               updates)
      params[g] = optax.apply_updates(state.params[g], updates)
      metrics[f"grad_norm_{g}"] = optax.global_norm(grads[g])
      metrics[f"update_norm_{g}"] = optax.global_norm(updates)
      metrics[f"stepped_{g}"] = signals[g].astype(jnp.float32)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["update_norm"] = jnp.sqrt(sum(jnp.square(metrics[f"update_norm_{g}"])
                                          for g in tx.txs))
    metrics["tau_learning_rate"] = tx.schedules["tau"](state.step)
    return params, opt_state, metrics

  return apply_fn


# ------------------------------------------------------------------ accounting


def _bytes(tree: Any) -> int:
  return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def _count(tree: Any) -> int:
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def state_bytes(params: Any, opt_state: Any, decomp: Decomposition | None) -> dict:
  """Parameter and optimizer-state bytes per group (arrays or ShapeDtypeStructs).

  Without decomposition the single group is 'model'. `trainable_params` counts the
  parameters that receive updates (subtree mode: sigma minus the frozen base leaves).
  """
  if decomp is None:
    return {"params": {"model": _bytes(params)}, "opt_state": {"model": _bytes(opt_state)},
            "trainable_params": _count(params)}
  trainable = _count(params["tau"])
  if not decomp.freeze_sigma:
    frozen = sum(int(np.prod(s.shape)) for s in decomp.specs) if decomp.mode == "subtree" else 0
    trainable += _count(params["sigma"]) - frozen
  return {"params": {g: _bytes(params[g]) for g in GROUPS},
          "opt_state": {g: _bytes(opt_state.get(g, ())) for g in GROUPS},
          "trainable_params": trainable}
