"""The continued pre-training objective over rows with roles.

  loss = [sum_new CE + lambda_replay * sum_replay CE] / N_ce
       + replay_kd * r(t) * T^2 * [sum_replay w_row KL(teacher || student)] / N_ce
                  (T: kd_temperature, r(t): the ramp, w_row: replay_kd_focus's row weight)
       + replay_features * [sum_replay mean_k max(0, e_k - m)] / N_ce
                  (e_k: `residual_gap`'s relative error on block k's output, m its margin,
                   k over replay_features_blocks, a weighted mean where it gives weights)
       + lambda_kd * T^2 * [sum_distill KL(teacher || student)] / N_kd
       + l2sp / 2 * |theta - theta_0|^2 + ewc / 2 * sum F (theta - theta_0)^2
       + z_loss * [sum_new log(Z)^2 + lambda_replay * sum_replay log(Z)^2] / N_ce

N_ce is the number of CE tokens (loss-weighted tokens of new and replay rows;
lambda_replay does not enter it), N_kd the number of loss-weighted tokens of
distill rows. Both are counted over the whole global batch (`normalisers`), so
the objective does not depend on how a step is cut into microbatches: each
microbatch adds its sums over the global normalisers and 1/A of the
parameter-only terms (see step.py). lambda_replay = 1 is plain data mixing;
replay_kd > 0 adds the teacher's full next-token distribution as a soft target
on the replay rows (dark-experience replay); kd_tokens = 'forgotten' restricts
both KL terms to the tokens whose CE under the student exceeds the teacher's
(`forgotten_mask`); replay_kd_ramp = q in [-1, 1] makes
its weight linear in the step t of the stage's T steps, r(t) = 1 - q + 2 q t / (T - 1)
(mean 1 over the stage: q = 1 rises from 0 to 2 replay_kd, q = -1 falls);
replay_kd_focus = p != 0 weighs each replay row's KL by 2 sigmoid(p (g - g0)), g the
row's forgetting, g0 = replay_kd_focus_center (`row_focus_weights`);
replay_features > 0 (with replay_kd > 0) also holds every block's output (or the
blocks replay_features_blocks names) on the replay rows near the teacher's, beyond a
relative margin (`residual_gap`). The
teacher is a frozen copy of the stage's starting model; it runs only on the rows
gathered by `distill_index` (distill rows when lambda_kd > 0, replay rows when
replay_kd > 0). Every term is returned on its own in `aux`; every aux entry
adds up over microbatches.

By signal: loss_new = the CE (+ z-loss) of `new` rows over N_ce (what T
teaches), loss_old = loss - loss_new (replay CE, KL, L2-SP / EWC: what keeps D);
both are in `aux`. A parameter layout (train/layout.py) decides which
parameters follow which (the sigma / tau layout routes them).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cpt_jax import batch as batch_lib
from cpt_jax import config as config_lib
from cpt_jax.train import loss as loss_lib

Array = jax.Array
# Logical axis names (parallel/sharding.py) of a field's axes after its row axis.
_TOKENS = ("activation_length",)
_LOGITS = ("activation_length", "activation_vocab")
_RESIDUAL = (None, "activation_length", "activation_embed")  # [K, L, D] after the row axis


def kl_full(teacher_logits_NxLxV: Array, student_logits_NxLxV: Array,
            temperature: float) -> Array:
  """KL(softmax(t/T) || softmax(s/T)) per token at temperature T: [N, L]."""
  t = jax.nn.log_softmax(teacher_logits_NxLxV.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits_NxLxV.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def residual_gap(teacher_NxKxLxD: Array, student_NxKxLxD: Array, margin: float,
                 block_weights_K=None) -> Array:
  """How far the student's residual stream has left the teacher's, per token: [N, L].

  e_k = mean_D (student - teacher)^2 / mean_D teacher^2 on block k's output (a
  relative squared error, so one weight fits every width and depth); the gap is
  mean_k max(0, e_k - margin) (drift inside the margin costs nothing), weighted by
  `block_weights_K` [K] when given (sum_k w_k max(...) / sum_k w_k).
  """
  t = teacher_NxKxLxD.astype(jnp.float32)
  s = student_NxKxLxD.astype(jnp.float32)
  err_NxKxL = jnp.mean(jnp.square(s - t), axis=-1) / (jnp.mean(jnp.square(t), axis=-1) + 1e-6)
  over_NxKxL = jax.nn.relu(err_NxKxL - margin)
  if block_weights_K is None:
    return jnp.mean(over_NxKxL, axis=1)
  w_K = jnp.asarray(block_weights_K, jnp.float32)
  return jnp.einsum("nkl,k->nl", over_NxKxL, w_K / jnp.sum(w_K))


def forgotten_mask(student_ce_NxL: Array, teacher_ce_NxL: Array) -> Array:
  """1.0 where the student's next-token CE exceeds the teacher's, else 0.0: [N, L].

  What `kd_tokens='forgotten'` keeps of the KL: the tokens the student has lost
  since M. Where it predicts the text as well as M or better (what T taught that
  also holds on the old text), the teacher's distribution is not pulled back.
  A constant of the step (no gradient flows through the comparison).
  """
  keep = jax.lax.stop_gradient(student_ce_NxL) > teacher_ce_NxL
  return keep.astype(jnp.float32)


def row_focus_weights(student_ce_NxL: Array, teacher_ce_NxL: Array, weights_NxL: Array,
                      focus: float, center: float = 0.0) -> Array:
  """Each row's replay-KD weight 2 sigmoid(focus (g - center)), g its forgetting: [N].

  g = the row's mean next-token CE under the student minus under the teacher
  (nats per token over its loss-weighted tokens): the `online` strategy's score
  of the row, here measured on the step's own forwards. A row whose forgetting
  is `center` weighs 1 (center 0: a row the student predicts as well as M); for
  focus > 0 a more forgotten one up to 2 and a less forgotten one down to 0,
  for focus < 0 the other way round. The rows an
  `online` buffer replays are its most forgotten, so with center 0 nearly all
  weigh about 2; a center near their typical g spreads the weight among them.
  Per row, so it does not depend on how a step is cut into microbatches; a
  constant of the step (no gradient).
  """
  tok_N = jnp.maximum(jnp.sum(weights_NxL, axis=-1), 1.0)
  gap_N = loss_lib.row_sums(student_ce_NxL - teacher_ce_NxL, weights_NxL) / tok_N
  return jax.lax.stop_gradient(2.0 * jax.nn.sigmoid(focus * (gap_N - center)))


def teacher_topk(teacher_logits_NxLxV: Array, k: int,
                 temperature: float) -> tuple[Array, Array]:
  """The teacher's top-k log-probabilities [N, L, J] and their token ids [N, L, J].

  This is all the top-k KL needs, so teacher outputs can be precomputed and stored.
  """
  t = jax.nn.log_softmax(teacher_logits_NxLxV.astype(jnp.float32) / temperature, axis=-1)
  logp_NxLxJ, ids_NxLxJ = jax.lax.top_k(t, k)
  return logp_NxLxJ, ids_NxLxJ


def kl_topk(teacher_logp_NxLxJ: Array, teacher_ids_NxLxJ: Array,
            student_logits_NxLxV: Array, temperature: float) -> Array:
  """KL over k+1 buckets (the teacher's top-k tokens and 'the rest'): [N, L].

  Exactly zero when student == teacher, positive otherwise; needs only the
  teacher's top-k log-probabilities.
  """
  s = jax.nn.log_softmax(student_logits_NxLxV.astype(jnp.float32) / temperature, axis=-1)
  s_top = jnp.take_along_axis(s, teacher_ids_NxLxJ, axis=-1)
  p_top = jnp.exp(teacher_logp_NxLxJ)
  kl_top = jnp.sum(p_top * (teacher_logp_NxLxJ - s_top), axis=-1)
  # The tail masses, clipped to [0, 1]: float32 sums of the top-k can pass 1.
  # A zero teacher tail contributes exactly 0 (0 log 0 = 0).
  tiny = 1e-12
  t_rest = jnp.clip(1.0 - jnp.sum(p_top, axis=-1), 0.0, 1.0)
  s_rest = jnp.clip(1.0 - jnp.sum(jnp.exp(s_top), axis=-1), tiny, 1.0)
  tail = jnp.where(t_rest > 0,
                   t_rest * (jnp.log(jnp.maximum(t_rest, tiny)) - jnp.log(s_rest)), 0.0)
  return kl_top + tail


def take_rows(x_BxX: Array, idx_DxN: Array, axes: tuple = ()) -> Array:
  """The rows `idx_DxN` of `x_BxX`, gathered within each of D row blocks: [D N, ...].

  Block d is rows d B/D .. (d+1) B/D - 1 (one device's rows under the batch
  sharding); idx_DxN[d] indexes into block d, -1 = an unused slot (gives the
  block's first row). Output rows d N .. (d+1) N - 1 come from block d, so the
  gather (and its transpose, a scatter-add into the rows) stays on each
  device: no collective ever carries a [N, L, V] array. `axes` names x's axes
  after the row axis for the sharding constraints.
  """
  shards, n = idx_DxN.shape
  names = ("activation_batch", None) + tuple(axes)
  x_DxRxX = nn.with_logical_constraint(
      x_BxX.reshape(shards, x_BxX.shape[0] // shards, *x_BxX.shape[1:]), names)
  got_DxNxX = jax.vmap(lambda x_RxX, i_N: jnp.take(x_RxX, i_N, axis=0))(
      x_DxRxX, jnp.maximum(idx_DxN, 0))
  got_DxNxX = nn.with_logical_constraint(got_DxNxX, names)
  return got_DxNxX.reshape(shards * n, *x_BxX.shape[1:])


def on_row_blocks(fn: Callable, x_NxX: Array) -> Any:
  """fn(x) with fn run on each device's block of rows (row axis: `activation_batch`).

  Under a mesh and logical axis rules this is a shard_map over the mesh axes the
  rows are sharded on (the others stay automatic): XLA's partitioner gathers
  the whole operand of a top-k whose row axis is sharded, which for the
  teacher's logits is every teacher row's [L, V] on every device. Without a
  mesh, fn(x). fn must act on rows independently.
  """
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  axes = nn.logical_to_mesh_axes(("activation_batch",), rules)[0] if rules else None
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  if mesh.empty or not any(mesh.shape.get(a, 1) > 1 for a in axes):
    return fn(x_NxX)
  rows = P(axes)
  return jax.shard_map(fn, in_specs=rows, out_specs=rows, axis_names=set(axes),
                       check_vma=False)(x_NxX)


def l2_to_anchor(params: Any, anchor: Any, weights: Any | None = None) -> Array:
  """sum w * (theta - theta_0)^2 over all leaves (w = 1 for L2-SP, Fisher for EWC)."""
  if weights is None:
    terms = jax.tree.map(lambda p, a: jnp.sum(jnp.square(p - a)), params, anchor)
  else:
    terms = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square(p - a)), params, anchor, weights)
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def normalisers(batch: dict) -> dict[str, Array]:
  """The token counts the objective divides by, over the whole (global) batch.

  ce_tokens: loss-weighted tokens of new and replay rows (N_ce);
  kd_tokens: loss-weighted tokens of distill rows (N_kd);
  param_share: the share of the parameter-only terms (L2-SP, EWC) one call adds
  (1 here; 1/A for each of A microbatches).
  """
  weights_BxL = batch["loss_weights"].astype(jnp.float32)
  roles_B = batch["roles"]
  tok_row_B = jnp.sum(weights_BxL, axis=-1)
  is_ce_B = (roles_B == batch_lib.NEW) | (roles_B == batch_lib.REPLAY)
  return {"ce_tokens": jnp.sum(tok_row_B * is_ce_B),
          "kd_tokens": jnp.sum(tok_row_B * (roles_B == batch_lib.DISTILL)),
          "param_share": jnp.ones((), jnp.float32)}


def make_loss_fn(apply_fn: Callable, obj_cfg: Any, num_domains: int, z_loss: float = 0.0,
                 layout: Any = None, total_steps: int = 0, features_fn: Callable | None = None):
  """Returns loss_fn(params, batch, frozen, norms=None) -> (loss, aux).

  apply_fn(model_params, inputs, segment_ids, positions) -> logits [B, L, V].
  batch: the fields of cpt_jax/batch.py, plus optionally `distill_index` [D, N]
    (the rows the teacher runs on: distill rows, and replay rows when replay_kd
    > 0; indices within each of D row blocks, -1 = unused slot: `take_rows`,
    step.distill_index). Without it, or with lambda_kd == replay_kd == 0, no
    teacher forward is traced at all.
  frozen: {'teacher': model params, 'fisher': tree} as the objective needs.
  norms: `normalisers` of the global batch when `batch` is one of its
    microbatches (default: `batch`'s own); with replay_kd_ramp != 0 also
    'step', the step's index in the stage (the train step adds it).
  total_steps: the stage's steps (train.steps), needed by replay_kd_ramp.
  features_fn(model_params, inputs, segment_ids, positions) -> (logits [B, L, V],
    every block's output [K, B, L, D]) (RunContext.features_fn), needed by
    replay_features; the student and the teacher then run through it instead.
  layout: the parameter layout (train/layout.py; default: params are the
    model's): the model runs on `layout.merge(params)`, L2-SP / EWC act on
    `layout.regularized(params)`.
  """
  merge = layout.merge if layout is not None else _identity
  regularized = layout.regularized if layout is not None else _identity
  lambda_replay = float(obj_cfg.lambda_replay)
  lambda_kd = float(obj_cfg.lambda_kd)
  replay_kd = float(obj_cfg.get("replay_kd", 0.0))
  ramp = float(obj_cfg.get("replay_kd_ramp", 0.0)) if replay_kd > 0 else 0.0
  if ramp and total_steps < 1:
    raise ValueError("objective.replay_kd_ramp needs the stage's steps (total_steps)")
  temperature = float(obj_cfg.kd_temperature)
  topk = int(obj_cfg.kd_topk)
  forgotten_only = obj_cfg.get("kd_tokens", "all") == "forgotten"
  focus = float(obj_cfg.get("replay_kd_focus", 0.0)) if replay_kd > 0 else 0.0  # p
  focus_center = float(obj_cfg.get("replay_kd_focus_center", 0.0))
  replay_features = float(obj_cfg.get("replay_features", 0.0)) if replay_kd > 0 else 0.0
  features_margin = float(obj_cfg.get("replay_features_margin", 0.0))
  features_blocks = str(obj_cfg.get("replay_features_blocks", ""))
  if replay_features and features_fn is None:
    raise ValueError("objective.replay_features needs the model's block outputs: pass "
                     "make_loss_fn(features_fn=RunContext.features_fn)")
  l2sp = float(obj_cfg.l2sp)
  ewc = float(obj_cfg.ewc)
  nroles = len(batch_lib.ROLES)
  # CE weight per role: new, replay, distill (KL only), eval (never trained).
  ce_role_weight = jnp.asarray([1.0, lambda_replay, 0.0, 0.0], jnp.float32)

  def loss_fn(params, batch, frozen, norms=None):
    norms = normalisers(batch) if norms is None else norms
    ce_den, kd_den = norms["ce_tokens"], norms["kd_tokens"]
    param_share = norms["param_share"]
    if replay_features:
      logits_BxLxV, res_KxBxLxD = features_fn(merge(params), batch["inputs"],
                                              batch["segment_ids"], batch["positions"])
    else:
      logits_BxLxV = apply_fn(merge(params), batch["inputs"], batch["segment_ids"],
                              batch["positions"])
    ce_BxL, log_z_BxL = loss_lib.cross_entropy(logits_BxLxV, batch["targets"])
    weights_BxL = batch["loss_weights"].astype(jnp.float32)
    roles_B = batch["roles"]

    # Monitoring sums: CE per row -> per domain and per role.
    ce_row_B = loss_lib.row_sums(ce_BxL, weights_BxL)
    tok_row_B = jnp.sum(weights_BxL, axis=-1)
    aux = {
        "domain_ce_sum": loss_lib.group_sums(ce_row_B, batch["domain_ids"], num_domains),
        "domain_tokens": loss_lib.group_sums(tok_row_B, batch["domain_ids"], num_domains),
        "role_ce_sum": loss_lib.group_sums(ce_row_B, roles_B, nroles),
        "role_tokens": loss_lib.group_sums(tok_row_B, roles_B, nroles),
    }

    ce_w_BxL = weights_BxL * ce_role_weight[roles_B][:, None]
    ce_term = loss_lib.safe_div(jnp.sum(ce_BxL * ce_w_BxL), ce_den)
    loss = ce_term
    aux["ce_term"] = ce_term
    if z_loss:
      z_term = z_loss * loss_lib.safe_div(jnp.sum(jnp.square(log_z_BxL) * ce_w_BxL), ce_den)
      aux["z_term"] = z_term
      loss = loss + z_term
    # The new signal: CE (+ z-loss) of new rows; everything else is the old signal.
    new_w_BxL = ce_w_BxL * (roles_B == batch_lib.NEW)[:, None]
    tok_BxL = ce_BxL + z_loss * jnp.square(log_z_BxL) if z_loss else ce_BxL
    loss_new = loss_lib.safe_div(jnp.sum(tok_BxL * new_w_BxL), ce_den)

    teacher_rows = 0
    if (lambda_kd > 0 or replay_kd > 0) and "distill_index" in batch:
      idx_DxN = batch["distill_index"]
      take = lambda x, axes: take_rows(x, idx_DxN, axes)
      role_N = jnp.where(idx_DxN.reshape(-1) >= 0, take(roles_B, ()), -1)
      teacher_in = (take(batch["inputs"], _TOKENS), take(batch["segment_ids"], _TOKENS),
                    take(batch["positions"], _TOKENS))
      if replay_features:
        teacher_logits, t_res_KxNxLxD = features_fn(frozen["teacher"], *teacher_in)
        t_res_KxNxLxD = jax.lax.stop_gradient(t_res_KxNxLxD)
      else:
        teacher_logits = apply_fn(frozen["teacher"], *teacher_in)
      teacher_logits = jax.lax.stop_gradient(teacher_logits)
      student_logits = take(logits_BxLxV, _LOGITS)
      if topk > 0:
        t_logp, t_ids = on_row_blocks(
            lambda t: teacher_topk(t, topk, temperature), teacher_logits)
        kl_NxL = kl_topk(t_logp, t_ids, student_logits, temperature)
      else:
        kl_NxL = kl_full(teacher_logits, student_logits, temperature)
      tok_w_NxL = take(weights_BxL, _TOKENS)
      if forgotten_only or (replay_kd > 0 and focus):  # both compare the two models' CE
        student_ce_NxL = take(ce_BxL, _TOKENS)
        teacher_ce_NxL, _ = loss_lib.cross_entropy(teacher_logits,
                                                   take(batch["targets"], _TOKENS))
      if forgotten_only:
        keep_NxL = forgotten_mask(student_ce_NxL, teacher_ce_NxL)
        kl_NxL = kl_NxL * keep_NxL
        aux["kd_kept_tokens"] = jnp.sum(tok_w_NxL * keep_NxL * (role_N >= 0)[:, None])
      if lambda_kd > 0:
        w_NxL = tok_w_NxL * (role_N == batch_lib.DISTILL)[:, None]
        kd_term = loss_lib.safe_div(jnp.sum(kl_NxL * w_NxL), kd_den)
        aux["kd_term"] = kd_term
        aux["kd_tokens"] = jnp.sum(w_NxL)
        loss = loss + lambda_kd * temperature ** 2 * kd_term
      if replay_kd > 0:  # shares the CE normaliser, like the replay rows' CE
        is_replay_N = (role_N == batch_lib.REPLAY).astype(jnp.float32)
        w_NxL = tok_w_NxL * is_replay_N[:, None]
        if focus:
          row_w_N = row_focus_weights(student_ce_NxL, teacher_ce_NxL, tok_w_NxL, focus,
                                      focus_center)
          w_NxL = w_NxL * row_w_N[:, None]
          aux["replay_kd_row_weight"] = jnp.sum(row_w_N * is_replay_N)
          aux["replay_kd_rows"] = jnp.sum(is_replay_N)
        rkd_term = loss_lib.safe_div(jnp.sum(kl_NxL * w_NxL), ce_den)
        aux["replay_kd_term"] = rkd_term
        weight = replay_kd
        if ramp:
          t = jnp.minimum(norms["step"] / max(total_steps - 1, 1), 1.0)
          weight = replay_kd * (1.0 - ramp + 2.0 * ramp * t)
          aux["replay_kd_weight"] = weight * param_share  # adds up to weight over microbatches
        loss = loss + weight * temperature ** 2 * rkd_term
        if replay_features:
          s_res, t_res = res_KxBxLxD, t_res_KxNxLxD
          held = config_lib.feature_blocks(features_blocks, s_res.shape[0])
          block_w = None
          if list(held) != list(range(s_res.shape[0])):  # a static subset of the K blocks
            s_res, t_res = s_res[np.asarray(list(held))], t_res[np.asarray(list(held))]
          if len(set(held.values())) > 1:
            block_w = np.asarray(list(held.values()), np.float32)
          s_res_NxKxLxD = take(jnp.moveaxis(s_res, 0, 1), _RESIDUAL)
          gap_NxL = residual_gap(jnp.moveaxis(t_res, 0, 1), s_res_NxKxLxD, features_margin,
                                 block_w)
          feat_term = loss_lib.safe_div(jnp.sum(gap_NxL * tok_w_NxL * is_replay_N[:, None]),
                                        ce_den)
          aux["replay_features_term"] = feat_term
          loss = loss + replay_features * feat_term
      teacher_rows = idx_DxN.size
    aux["teacher_rows"] = jnp.asarray(teacher_rows, jnp.int32)

    reg_params = regularized(params)
    if l2sp > 0:
      term = 0.5 * param_share * l2_to_anchor(reg_params, frozen["teacher"])
      aux["l2sp_term"] = term
      loss = loss + l2sp * term
    if ewc > 0:
      term = 0.5 * param_share * l2_to_anchor(reg_params, frozen["teacher"], frozen["fisher"])
      aux["ewc_term"] = term
      loss = loss + ewc * term
    aux["loss"] = loss
    aux["loss_new"], aux["loss_old"] = loss_new, loss - loss_new
    return loss, aux

  return loss_fn


def _identity(params):
  return params
