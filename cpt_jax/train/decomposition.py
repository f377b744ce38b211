"""The sigma / tau layout: gradient routing and one optimizer per group (`decomposition`).

The model's parameters theta are split into sigma (the base model, always the
full model tree) and tau (a per-stage delta on some of its leaves, train/tau.py):

  state.params = {'sigma': model params, 'tau': tau tree};  W = sigma + delta(tau)

Gradient routing (`routing=True`), inside one jitted step. The objective's loss
splits by signal: loss_new = aux['loss_new'] (CE + z-loss of `new` rows) and
loss_old = loss - loss_new (CE of `replay` rows, KL of `distill` rows, L2-SP / EWC, which
act on sigma alone, anchored at the stage's starting model); routing means
grad_tau = d loss_new / d tau and grad_sigma = d loss_old / d sigma.

Rows never interact in the forward (attention is within a row, the KL's rows are
gathered row by row), and each row is in one signal only (loss_new reads `new` rows,
loss_old every other row), so the activation cotangents of the whole loss on a row are
those of that row's signal. One backward of the whole loss therefore carries both
gradients, if each parameter's gradient sums the right rows: with tau on Dense kernels
only (`Tau.on_kernels_only`) the model gets sigma's weights with tau's A and scale * B beside
them (`Tau.with_adapters`) and the mask of new rows m_new (m_old = 1 - m_new). Each
targeted Dense computes Y = X (W + A B) as the merged model does; its backward
(model/transformer.py) gives dX = dY (W + A B)^T from all rows, dW = X^T (m_old dY) to
sigma, and dA = X^T (m_new dY B^T), dB = (m_new X A)^T dY to tau, which cost
O(tokens x d x r), not the full-size product of the merged weights' gradient. A subtree
delta on a Dense kernel sits beside it the same way: the Dense computes X (W + delta)
and d delta = X^T (m_new dY); W, frozen under its delta, gets none. Every
other use of a sigma parameter (kernels, norm scales, biases, embeddings) likewise takes
the old rows' cotangents only. L2-SP / EWC reach sigma directly, not through rows. The
result equals the two pull-backs below to float rounding (tests/test_route.py); XLA's
FLOP count of the step is 1.02x a plain step with LoRA on q, v and the MLP (README,
"Performance").

Otherwise (tau entries on leaves other than Dense kernels: norm scales, embeddings,
biases) tau is merged into the weights (W = sigma + delta(tau)) and one forward is
traced with `jax.vjp` on [loss_new, loss_old]; its vjp function is called twice, with
cotangents [1, 0] (kept: tau's gradient) and [0, 1] (kept: sigma's gradient): two
backward passes, the second also through the full-size dW of each targeted kernel, and
only on steps with an old signal (its rows are counted in aux['pullback_rows']; the loop
adds their backward FLOPs to the stage's budget, part 'second_pullback'). With
`freeze_sigma` only tau's gradient is taken, and sigma gets neither a gradient nor
optimizer state. With `routing=False` both groups follow the full loss (one backward,
merged weights).

Optimizers: one per group (sigma: `config.optimizer`; tau: the same with the
`decomposition.tau_*` overrides), each with its own clipping, schedule and weight decay;
opt_state = {'sigma': ..., 'tau': ...}, with no 'sigma' entry when sigma is frozen.

"Exactly zero update". A group's gradient is exactly zero when the step has no rows of its
signal (routing makes loss_old identically 0 on a new-only batch, etc.), but AdamW would
still move it (momentum from earlier steps, weight decay). With `skip_idle_updates` (the
default) a group whose signal is absent in the step gets an update of exactly 0 (its
moments see a zero gradient and its step count advances, so schedules stay on the global
step). Signal: new = any `new` tokens; old = any `replay` tokens (lambda_replay > 0), any
distill tokens under KD, or L2-SP / EWC switched on. Without routing: either.

Stages: a stage with `decomposition.mode` set starts a fresh tau on top of the params it
warm-starts from; a decomposed source checkpoint (an earlier stage's sigma + tau) is merged
first, so each stage's sigma is the full model the previous stage ended with
(`checkpoint.restore_merged_params`). The run evaluates every domain with and without the
stage's tau (summary `eval_without_tau`) and reports parameter / optimizer-state bytes per
group (summary `state_bytes`, metrics `state_bytes`).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cpt_jax import batch as batch_lib
from cpt_jax.train import layout as layout_lib
from cpt_jax.train import optimizer as optimizer_lib
from cpt_jax.train import projection as projection_lib
from cpt_jax.train import split_moments as split_moments_lib
from cpt_jax.train import tau as tau_lib

GROUPS = ("sigma", "tau")
ROWS = "adapter_rows"  # the routed step's [B] mask of new rows, beside the groups in `params`


class SigmaTau:
  """The layout {'sigma': model params, 'tau': tau tree} (see the module docstring)."""

  groups = GROUPS
  has_delta = True  # base(params) = sigma, the model without this stage's tau

  def __init__(self, tau: tau_lib.Tau, config: Any):
    dc, o = config.decomposition, config.objective
    self.tau = tau
    self.routing = bool(dc.routing)
    self.freeze_sigma = bool(dc.freeze_sigma)
    self.skip_idle_updates = bool(dc.skip_idle_updates)
    self.old_always = layout_lib.old_signal_always(o)
    self.lambda_replay, self.lambda_kd = float(o.lambda_replay), float(o.lambda_kd)
    self.replay_kd = float(o.replay_kd)
    self.txs, self.schedules = _group_optimizers(self, config)
    self.tx = GroupOptimizer(self.txs)
    self.schedule = self.schedules["sigma"]

  @property
  def trainable_groups(self) -> tuple[str, ...]:
    return ("tau",) if self.freeze_sigma else GROUPS

  # ---------------------------------------------------------------- the tree
  def boxed(self, model_boxed: Any) -> dict:
    return {"sigma": model_boxed, "tau": self.tau.boxed()}

  def init(self, model_params: Any, rng: jax.Array) -> dict:
    """{'sigma': model_params, 'tau': fresh tau} (jit-safe)."""
    return {"sigma": model_params, "tau": self.tau.init(rng)}

  def merge(self, params: dict) -> Any:
    """Model params W = sigma + delta(tau); inside the routed step (`grads` adds the rows
    under ROWS) sigma's weights with tau as side branches and the rows' routing."""
    if ROWS in params:
      return self.tau.with_adapters(params, params[ROWS])
    return self.tau.merge(params)

  def base(self, params: dict) -> Any:
    return params["sigma"]

  def regularized(self, params: dict) -> Any:
    return params["sigma"]

  def opt_shardings(self, abstract_opt: Any, param_sh: dict, rep: Any) -> Any:
    """Every optimizer-state leaf that mirrors a parameter (Adam moments) sits under the
    group key and ends in that parameter's path; it gets the parameter's sharding. Other
    leaves (counts) are replicated."""
    by_group = {}
    for g, sh in param_sh.items():
      flat, _ = jax.tree_util.tree_flatten_with_path(sh)
      by_group[g] = {tau_lib.path_keys(p): s for p, s in flat}

    def leaf(path, x):
      keys = tau_lib.path_keys(path)
      table = by_group.get(keys[0], {})
      for n in range(len(keys) - 1, 0, -1):
        s = table.get(keys[-n:])
        if s is not None and len(s.spec) <= len(x.shape):
          return s
      return rep

    return jax.tree_util.tree_map_with_path(leaf, abstract_opt)

  # ---------------------------------------------------------------- the step
  def signals(self, aux: dict) -> dict[str, jax.Array]:
    """Whether each group has a gradient signal this step (see the module docstring)."""
    role_tok = aux["role_tokens"]
    new = role_tok[batch_lib.NEW] > 0
    old = jnp.asarray(self.old_always)
    if self.lambda_replay > 0 or self.replay_kd > 0:
      old = old | (role_tok[batch_lib.REPLAY] > 0)
    if self.lambda_kd > 0 and "kd_tokens" in aux:
      old = old | (aux["kd_tokens"] > 0)
    if not self.routing:
      new = old = new | old
    return {"sigma": old, "tau": new}

  def grads(self, loss_fn: Callable, params: dict, batch: dict, frozen: Any):
    """({group: gradient}, aux): tau follows loss_new, sigma loss_old (with routing)."""
    groups = self.trainable_groups
    if self.routing and self.tau.on_kernels_only:
      # One backward of the whole loss; the model routes each row's cotangents (new rows
      # to tau's adapters, the others to sigma): see the module docstring.
      rows_B = (batch["roles"] == batch_lib.NEW).astype(jnp.float32)

      def routed(trainable):
        return loss_fn({**params, **trainable, ROWS: rows_B}, batch, frozen)

      (_, aux), g = jax.value_and_grad(routed, has_aux=True)({k: params[k] for k in groups})
      return g, aux

    def by_signal(trainable):
      loss, aux = loss_fn({**params, **trainable}, batch, frozen)
      return layout_lib.signal_losses(loss, aux), aux

    _, vjp_fn, aux = jax.vjp(by_signal, {g: params[g] for g in groups}, has_aux=True)
    if not self.routing:
      (g,) = vjp_fn(jnp.ones((2,), jnp.float32))
      return g, aux
    (g_new,) = vjp_fn(jnp.asarray([1.0, 0.0], jnp.float32))
    grads = {"tau": g_new["tau"]}
    if "sigma" in groups:
      grads["sigma"], aux["pullback_rows"] = layout_lib.old_signal_grad(
          vjp_fn, batch, self.old_always, params["sigma"], part=lambda g: g["sigma"])
    return grads, aux

  def apply(self, grads: dict, state: Any, aux: dict):
    """Per-group updates; a group without its signal is not moved (skip_idle_updates)."""
    signals = self.signals(aux)
    params, opt_state, metrics = dict(state.params), {}, {}
    for g, gtx in self.txs.items():
      updates, opt_state[g] = gtx.update(grads[g], state.opt_state[g], state.params[g])
      if self.skip_idle_updates:
        updates = jax.tree.map(lambda u, s=signals[g]: jnp.where(s, u, jnp.zeros_like(u)),
                               updates)
      params[g] = optax.apply_updates(state.params[g], updates)
      metrics[f"grad_norm_{g}"] = optax.tree.norm(grads[g])
      metrics[f"update_norm_{g}"] = optax.tree.norm(updates)
      metrics[f"stepped_{g}"] = signals[g].astype(jnp.float32)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["update_norm"] = jnp.sqrt(sum(jnp.square(metrics[f"update_norm_{g}"])
                                          for g in self.txs))
    metrics["tau_learning_rate"] = self.schedules["tau"](state.step)
    return params, opt_state, metrics

  # ---------------------------------------------------------------- accounting
  def state_bytes(self, params: dict, opt_state: dict) -> dict:
    """Bytes per group; `trainable_params` counts the parameters that receive updates
    (subtree mode: sigma minus the frozen base leaves)."""
    trainable = layout_lib.tree_size(params["tau"])
    if not self.freeze_sigma:
      frozen = sum(math.prod(s.shape) for s in self.tau.specs) \
          if self.tau.mode == "subtree" else 0
      trainable += layout_lib.tree_size(params["sigma"]) - frozen
    return {"params": {g: layout_lib.tree_bytes(params[g]) for g in GROUPS},
            "opt_state": {g: layout_lib.tree_bytes(opt_state.get(g, ())) for g in GROUPS},
            "trainable_params": trainable}


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


def _group_optimizers(layout: SigmaTau, config: Any):
  """({trainable group: optax transformation}, {group: schedule})."""
  total = config.train.steps
  txs, schedules = {}, {}
  tau_tx, schedules["tau"] = optimizer_lib.make_optimizer(
      tau_optimizer_config(config.optimizer, config.decomposition), total)
  sigma_tx, schedules["sigma"] = optimizer_lib.make_optimizer(config.optimizer, total)
  if not layout.freeze_sigma:
    if layout.tau.mode == "subtree":
      sigma_tx = optax.multi_transform({"train": sigma_tx, "frozen": optax.set_to_zero()},
                                       layout.tau.sigma_labels)
    txs["sigma"] = sigma_tx
  txs["tau"] = tau_tx
  return txs, schedules


class GroupOptimizer:
  """One optax transformation per trainable group; state {group: state}.

  Only trainable groups have an entry, so a frozen sigma has no optimizer state at all.
  `update` is the plain optax interface (no routing signals); the train step uses
  `SigmaTau.apply`, which also honours `skip_idle_updates`.
  """

  def __init__(self, txs: dict[str, optax.GradientTransformation]):
    self.txs = txs

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


def make_layout(config: Any, model_boxed: Any) -> Any:
  """The layout `config.decomposition` asks for: `SigmaTau`, or when decomposition.mode
  is '' `layout.Plain` (`projection.Projected` with objective.projection set,
  `split_moments.SplitMoments` with optimizer.old_moments='separate')."""
  if not config.decomposition.mode:
    tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
    mode = config.objective.get("projection", "")
    if mode:
      return projection_lib.Projected(tx, schedule, mode, config.objective)
    if config.optimizer.get("old_moments", "shared") == "separate":
      return split_moments_lib.SplitMoments(config.optimizer, config.train.steps,
                                            config.objective)
    return layout_lib.Plain(tx, schedule)
  return SigmaTau(tau_lib.build(config.decomposition, model_boxed), config)
