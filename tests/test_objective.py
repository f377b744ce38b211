"""The CPT objective: KL distillation, role routing, regularisers, teacher skipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax import config as config_lib
from cpt_jax.train import loss as loss_lib
from cpt_jax.train import objective
from cpt_jax.train import step as step_lib
from tests.helpers import tiny_config


def _logits(seed, shape=(2, 5, 11)):
  return jax.random.normal(jax.random.key(seed), shape) * 2.0


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_full_kl_zero_iff_equal(tau):
  t = _logits(0)
  assert float(jnp.abs(objective.kl_full(t, t, tau)).max()) < 1e-6
  assert float(objective.kl_full(t, _logits(1), tau).min()) > 0


def test_topk_kl_zero_iff_equal_and_matches_full_kl_for_full_k():
  t, s = _logits(0), _logits(1)
  lp, ids = objective.teacher_topk(t, 3, 1.0)
  assert float(jnp.abs(objective.kl_topk(lp, ids, t, 1.0)).max()) < 1e-5
  assert float(objective.kl_topk(lp, ids, s, 1.0).min()) > 0
  lp_all, ids_all = objective.teacher_topk(t, 11, 1.0)
  np.testing.assert_allclose(objective.kl_topk(lp_all, ids_all, s, 1.0),
                             objective.kl_full(t, s, 1.0), atol=1e-4)


class _Counting:
  """A toy apply_fn (embedding + linear) that counts how often it is traced."""

  def __init__(self):
    self.calls = 0

  def __call__(self, params, inputs, segment_ids, positions):
    self.calls += 1
    return params["emb"][inputs] @ params["out"]


def _toy(seed=0, v=13, d=4):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"emb": jax.random.normal(k1, (v, d)), "out": jax.random.normal(k2, (d, v))}


def _batch(roles):
  b = batch_lib.synthetic_batch(np.random.default_rng(0), len(roles), 6, 13, roles=tuple(roles))
  return {k: jnp.asarray(v) for k, v in b.items()}


def _obj(**kw):
  c = tiny_config().objective
  c.update({"lambda_kd": 1.0, **kw})
  return c


def test_kd_only_on_distill_rows_and_no_teacher_gradient():
  apply_fn = _Counting()
  loss_fn = objective.make_loss_fn(apply_fn, _obj(), num_domains=1)
  student, teacher = _toy(0), _toy(1)
  roles = [batch_lib.NEW, batch_lib.DISTILL, batch_lib.REPLAY, batch_lib.DISTILL]
  batch = _batch(roles)
  # distill_index also points at a `new` row (0): it must be masked out.
  batch["distill_index"] = jnp.asarray([[1, 3, 0, -1]], jnp.int32)  # [D=1, N]
  loss, aux = loss_fn(student, batch, {"teacher": teacher})
  assert apply_fn.calls == 2  # student + teacher
  assert float(aux["kd_tokens"]) == float(batch["loss_weights"][np.array([1, 3])].sum())
  assert float(aux["kd_term"]) > 0
  g_teacher = jax.grad(lambda t: loss_fn(student, batch, {"teacher": t})[0])(teacher)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g_teacher))
  # Student == teacher: the KL term vanishes.
  _, aux_same = loss_fn(student, batch, {"teacher": student})
  assert abs(float(aux_same["kd_term"])) < 1e-6
  # Distill rows carry no CE: changing their targets leaves the CE term unchanged.
  b2 = dict(batch)
  b2["targets"] = batch["targets"].at[1].set((batch["targets"][1] + 1) % 13)
  np.testing.assert_allclose(loss_fn(student, b2, {"teacher": teacher})[1]["ce_term"],
                             aux["ce_term"], rtol=1e-6)


def test_no_distill_rows_means_no_teacher_forward():
  apply_fn = _Counting()
  loss_fn = objective.make_loss_fn(apply_fn, _obj(), num_domains=1)
  batch = _batch([batch_lib.NEW, batch_lib.REPLAY])
  _, aux = loss_fn(_toy(0), batch, {"teacher": _toy(1)})
  assert apply_fn.calls == 1 and int(aux["teacher_rows"]) == 0 and "kd_term" not in aux


def test_replay_weight_and_regularisers():
  apply_fn = _Counting()
  batch = _batch([batch_lib.NEW, batch_lib.REPLAY])
  p, t = _toy(0), _toy(1)
  logits = apply_fn(p, batch["inputs"], None, None)
  ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, batch["targets"][..., None], -1)[..., 0]
  w = batch["loss_weights"]
  # One token mean: lambda_replay weighs the replay rows' CE sum, the normaliser
  # is every CE token (new + replay) whatever lambda_replay is.
  for lam in (0.0, 0.5, 1.0, 3.0):
    fn = objective.make_loss_fn(apply_fn, _obj(lambda_kd=0.0, lambda_replay=lam), 1)
    new_sum, replay_sum = float(jnp.sum(ce[0] * w[0])), float(jnp.sum(ce[1] * w[1]))
    want = (new_sum + lam * replay_sum) / float(w[0].sum() + w[1].sum())
    assert float(fn(p, batch, {})[0]) == pytest.approx(want, rel=1e-5)
  l2 = objective.make_loss_fn(apply_fn, _obj(lambda_kd=0.0, l2sp=1.0), 1)
  loss_same, _ = l2(p, batch, {"teacher": p})
  loss_far, aux = l2(p, batch, {"teacher": t})
  assert float(loss_far) > float(loss_same)
  expected = 0.5 * sum(float(jnp.sum((p[k] - t[k]) ** 2)) for k in p)
  assert float(aux["l2sp_term"]) == pytest.approx(expected, rel=1e-5)
  ewc = objective.make_loss_fn(apply_fn, _obj(lambda_kd=0.0, ewc=1.0), 1)
  zero_f = jax.tree.map(jnp.zeros_like, p)
  assert float(ewc(p, batch, {"teacher": t, "fisher": zero_f})[1]["ewc_term"]) == 0.0
  ones_f = jax.tree.map(jnp.ones_like, p)
  assert float(ewc(p, batch, {"teacher": t, "fisher": ones_f})[1]["ewc_term"]) == \
      pytest.approx(expected, rel=1e-5)


def test_z_loss_term():
  apply_fn = _Counting()
  batch = _batch([batch_lib.NEW, batch_lib.REPLAY])
  p = _toy(0)
  fn = objective.make_loss_fn(apply_fn, _obj(lambda_kd=0.0), 1, z_loss=1e-2)
  loss, aux = fn(p, batch, {})
  logits = apply_fn(p, batch["inputs"], None, None)
  lz = jax.nn.logsumexp(logits, -1)
  w = batch["loss_weights"]
  assert float(aux["z_term"]) == pytest.approx(1e-2 * float(jnp.sum(lz ** 2 * w) / jnp.sum(w)),
                                               rel=1e-5)
  assert float(loss) == pytest.approx(float(aux["ce_term"] + aux["z_term"]), rel=1e-6)


def test_replay_kd_is_a_soft_target_on_replay_rows_only():
  apply_fn = _Counting()
  roles = [batch_lib.NEW, batch_lib.REPLAY, batch_lib.DISTILL, batch_lib.REPLAY]
  batch = _batch(roles)
  batch["distill_index"] = jnp.asarray(
      step_lib.distill_index(np.asarray(roles), 1, with_replay=True)[0])
  assert sorted(int(i) for i in batch["distill_index"].ravel() if i >= 0) == [1, 2, 3]
  student, teacher = _toy(0), _toy(1)
  fn = objective.make_loss_fn(apply_fn, _obj(lambda_kd=0.0, replay_kd=2.0), 1)
  loss, aux = fn(student, batch, {"teacher": teacher})
  assert "kd_term" not in aux  # lambda_kd = 0: distill rows get nothing
  # The KL of the replay rows (1, 3) over the CE normaliser (new + replay tokens).
  s_logits = apply_fn(student, batch["inputs"], None, None)
  t_logits = apply_fn(teacher, batch["inputs"], None, None)
  kl = objective.kl_full(t_logits, s_logits, 1.0)
  w = batch["loss_weights"]
  want = float((kl[1] * w[1]).sum() + (kl[3] * w[3]).sum()) / float(w[0].sum() + w[1].sum()
                                                                     + w[3].sum())
  assert float(aux["replay_kd_term"]) == pytest.approx(want, rel=1e-5)
  assert float(loss) == pytest.approx(float(aux["ce_term"]) + 2.0 * want, rel=1e-5)
  _, same = fn(student, batch, {"teacher": student})
  assert abs(float(same["replay_kd_term"])) < 1e-6
  # New rows' inputs do not move the replay KD term; a replay row's do.
  b2 = dict(batch, inputs=batch["inputs"].at[0].set((batch["inputs"][0] + 1) % 13))
  assert float(fn(student, b2, {"teacher": teacher})[1]["replay_kd_term"]) == pytest.approx(
      float(aux["replay_kd_term"]), rel=1e-6)
  b3 = dict(batch, inputs=batch["inputs"].at[1].set((batch["inputs"][1] + 1) % 13))
  assert float(fn(student, b3, {"teacher": teacher})[1]["replay_kd_term"]) != pytest.approx(
      float(aux["replay_kd_term"]), rel=1e-6)
  # Without replay_kd the teacher index holds only distill rows; without
  # lambda_kd only replay rows (the teacher never runs on rows nothing uses).
  assert step_lib.distill_index(np.asarray(roles), 1).tolist() == [[[2]]]
  assert step_lib.distill_index(np.asarray(roles), 1, with_replay=True,
                                with_distill=False).tolist() == [[[1, 3]]]


def test_topk_tail_is_never_negative():
  """A teacher whose top-k hold all its mass: the tail adds exactly nothing.

  In float32 the top-k probabilities can sum to 1 or past it; the teacher's tail
  is then empty and adds nothing, however much mass the student puts there.
  """
  t = jnp.asarray([[[9.0, 8.5, 8.0, -60.0, -60.0, -60.0]]], jnp.float32)
  s = jnp.asarray([[[8.0, 9.0, 8.2, 8.0, -60.0, -60.0]]], jnp.float32)
  lp, ids = objective.teacher_topk(t, 3, 1.0)
  kl = float(objective.kl_topk(lp, ids, s, 1.0)[0, 0])
  pt = np.exp(np.asarray(t[0, 0], np.float64)); pt /= pt.sum()
  ps = np.exp(np.asarray(s[0, 0], np.float64)); ps /= ps.sum()
  want = float(np.sum(pt[:3] * (np.log(pt[:3]) - np.log(ps[:3]))))
  assert kl == pytest.approx(want, abs=2e-6)
  assert float(objective.kl_topk(lp, ids, t, 1.0)[0, 0]) == pytest.approx(0.0, abs=1e-6)


def test_forgotten_mask_by_hand():
  """Label 0: the teacher predicts it with p = 0.78; students at 1/3, 0.78 and 0.92."""
  t = jnp.asarray([[[2.0, 0.0, 0.0]] * 3], jnp.float32)
  s = jnp.asarray([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0]]], jnp.float32)
  y = jnp.zeros((1, 3), jnp.int32)
  s_ce = -jax.nn.log_softmax(s)[..., 0]
  t_ce, _ = loss_lib.cross_entropy(t, y)
  assert objective.forgotten_mask(s_ce, t_ce).tolist() == [[1.0, 0.0, 0.0]]


class _Bigram:
  """apply_fn whose logits at a token are a row of the table for its input token."""

  def __call__(self, params, inputs, segment_ids, positions):
    return params["table"][inputs]


def _bigram_case(v, split_parity=False):
  """(batch, teacher, bump): rows new, replay, replay whose label is input + 1; the
  student is teacher + bump, which raises the label's logit for even inputs (it knows
  them better than M) and lowers it for odd ones (it has forgotten them).
  split_parity: replay row 1 holds only even inputs, row 2 only odd ones.
  """
  roles = [batch_lib.NEW, batch_lib.REPLAY, batch_lib.REPLAY]
  batch = _batch(roles)
  if split_parity:
    n = batch["inputs"].shape[1]
    batch["inputs"] = batch["inputs"].at[1].set(2 * (jnp.arange(n) % 6))
    batch["inputs"] = batch["inputs"].at[2].set(2 * (jnp.arange(n) % 6) + 1)
  batch["targets"] = (batch["inputs"] + 1) % v
  batch["distill_index"] = jnp.asarray(
      step_lib.distill_index(np.asarray(roles), 1, with_replay=True)[0])
  teacher = {"table": jax.random.normal(jax.random.key(3), (v, v))}
  sign = jnp.where(jnp.arange(v) % 2 == 0, 1.0, -1.0)
  bump = jax.nn.one_hot((jnp.arange(v) + 1) % v, v) * (0.7 * sign)[:, None]
  return batch, teacher, bump


def test_forgotten_kd_leaves_the_tokens_the_student_still_knows_alone():
  """Replay KD with kd_tokens='forgotten' on a bigram model whose label is input + 1.

  The student is the teacher with the label's logit raised (it knows the token
  better than M) for even inputs and lowered (it has forgotten it) for odd ones.
  A table row's gradient gathers its input's tokens: even rows must get what they
  get without replay KD, odd rows what they get with KD on every token.
  """
  v = 13
  batch, teacher, bump = _bigram_case(v)
  student = {"table": teacher["table"] + bump}
  frozen = {"teacher": teacher}

  def grads(**kw):
    fn = objective.make_loss_fn(_Bigram(), _obj(lambda_kd=0.0, kd_temperature=2.0, **kw), 1)
    return jax.grad(lambda p: fn(p, batch, frozen)[0])(student)["table"], fn

  g_none, _ = grads(replay_kd=0.0)
  g_all, _ = grads(replay_kd=3.0)
  g_forgot, fn = grads(replay_kd=3.0, kd_tokens="forgotten")
  even, odd = np.arange(0, v, 2), np.arange(1, v, 2)
  np.testing.assert_allclose(g_forgot[even], g_none[even], atol=1e-7)
  np.testing.assert_allclose(g_forgot[odd], g_all[odd], atol=1e-7)
  assert float(jnp.abs(g_all[even] - g_none[even]).max()) > 1e-3  # KD acts there otherwise
  # The kept tokens: replay tokens whose input is odd.
  w, x = np.asarray(batch["loss_weights"]), np.asarray(batch["inputs"])
  _, aux = fn(student, batch, frozen)
  assert float(aux["kd_kept_tokens"]) == float((w[1:] * (x[1:] % 2 == 1)).sum())
  # A student that has forgotten nothing gets no replay KD at all.
  better = {"table": teacher["table"] + jnp.abs(bump)}
  _, aux_better = fn(better, batch, frozen)
  assert float(aux_better["replay_kd_term"]) == 0.0 and float(aux_better["kd_kept_tokens"]) == 0


def test_replay_kd_focus_moves_the_kd_to_the_rows_the_student_forgot():
  """replay_kd_focus on a bigram model whose label is input + 1: replay row 1 holds
  only even inputs (the student knows their labels better than M), row 2 only odd
  ones (it has forgotten them). A sharp focus drops row 1's KD and doubles row 2's,
  a sharp negative one the reverse; focus 0 is plain replay KD; a moderate focus
  lies between.
  """
  v = 13
  batch, teacher, bump = _bigram_case(v, split_parity=True)
  student = {"table": teacher["table"] + bump}
  frozen = {"teacher": teacher}

  def run(**kw):
    fn = objective.make_loss_fn(_Bigram(), _obj(lambda_kd=0.0, kd_temperature=2.0, **kw), 1)
    g = jax.grad(lambda p: fn(p, batch, frozen)[0])(student)["table"]
    return g, fn(student, batch, frozen)

  g_none, _ = run(replay_kd=0.0)
  g_all, (loss_all, _) = run(replay_kd=3.0)
  g_sharp, (_, aux) = run(replay_kd=3.0, replay_kd_focus=1e3)
  even, odd = np.arange(0, v - 1, 2), np.arange(1, v, 2)
  kd_all = g_all - g_none
  assert float(jnp.abs(kd_all[even]).max()) > 1e-3  # plain KD acts on both rows
  np.testing.assert_allclose(g_sharp[even], g_none[even], atol=1e-6)
  np.testing.assert_allclose(g_sharp[odd] - g_none[odd], 2.0 * kd_all[odd], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(float(aux["replay_kd_row_weight"]), 2.0, atol=1e-5)
  assert float(aux["replay_kd_rows"]) == 2.0
  _, (loss_zero, aux_zero) = run(replay_kd=3.0, replay_kd_focus=0.0)
  assert float(loss_zero) == float(loss_all) and "replay_kd_row_weight" not in aux_zero
  # A centre above both rows' forgetting takes the KD off both; one below doubles both.
  g_high, _ = run(replay_kd=3.0, replay_kd_focus=1e3, replay_kd_focus_center=5.0)
  np.testing.assert_allclose(g_high, g_none, atol=1e-6)
  g_low, _ = run(replay_kd=3.0, replay_kd_focus=1e3, replay_kd_focus_center=-5.0)
  np.testing.assert_allclose(g_low - g_none, 2.0 * kd_all, rtol=1e-5, atol=1e-7)
  # A negative focus favours the row the student still knows: the mirror image.
  g_inverse, _ = run(replay_kd=3.0, replay_kd_focus=-1e3)
  np.testing.assert_allclose(g_inverse[odd], g_none[odd], atol=1e-6)
  np.testing.assert_allclose(g_inverse[even] - g_none[even], 2.0 * kd_all[even], rtol=1e-5,
                             atol=1e-7)
  g_mid, _ = run(replay_kd=3.0, replay_kd_focus=1.0)
  mid_odd = float(jnp.abs(g_mid[odd] - g_none[odd]).sum())
  mid_even = float(jnp.abs(g_mid[even] - g_none[even]).sum())
  assert float(jnp.abs(kd_all[odd]).sum()) < mid_odd < 2 * float(jnp.abs(kd_all[odd]).sum())
  assert 0 < mid_even < float(jnp.abs(kd_all[even]).sum())


@pytest.mark.parametrize("focus,replay_kd,match", [
    (-1.0, 0.0, r"objective.replay_kd_focus=-1.0 weighs .* objective.replay_kd=0"),
    (2.0, 0.0, r"objective.replay_kd_focus=2.0 weighs .* objective.replay_kd=0"),
    (0.0, 1.0, r"objective.replay_kd_focus_center=0.5 centres .*replay_kd_focus=0")])
def test_bad_replay_kd_focus_is_named(focus, replay_kd, match):
  c = tiny_config()
  c.train.init_checkpoint = "teacher"
  c.objective.update(replay_kd=replay_kd, replay_kd_focus=focus,
                     replay_kd_focus_center=0.5 if focus == 0 else 0.0)
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(c)


def test_bad_kd_tokens_is_named():
  c = tiny_config()
  c.objective.kd_tokens = "some"
  with pytest.raises(ValueError, match=r"objective.kd_tokens='some'"):
    config_lib.validate_config(c)


def test_residual_gap_is_scale_free_and_free_inside_its_margin():
  k0, k1 = jax.random.split(jax.random.key(0))
  t = jax.random.normal(k0, (3, 2, 5, 8))  # [N, K, L, D]
  s = t + 0.3 * jax.random.normal(k1, t.shape)
  assert float(jnp.abs(objective.residual_gap(t, t, 0.0)).max()) == 0.0
  gap = objective.residual_gap(t, s, 0.0)
  assert gap.shape == (3, 5) and float(gap.min()) > 0
  # One weight for every width: scaling both streams leaves the gap as it is.
  np.testing.assert_allclose(objective.residual_gap(10 * t, 10 * s, 0.0), gap, rtol=1e-5)
  # A margin above every block's error costs nothing; one below all of them only
  # lowers the gap by itself (the hinge's linear side).
  assert float(objective.residual_gap(t, s, 1e3).max()) == 0.0
  np.testing.assert_allclose(objective.residual_gap(t, s, 1e-4), gap - 1e-4, rtol=1e-5)


def _model_case(**objective_kw):
  """(ctx, student params, teacher params, batch with replay rows 1 and 3, objective)."""
  from cpt_jax.train import context as context_lib
  from cpt_jax.train import state as state_lib
  c = tiny_config()
  c.train.init_checkpoint = "teacher"  # only satisfies validation: the test builds the teacher
  c.objective.update({"lambda_kd": 0.0, "replay_kd": 1.0, "kd_temperature": 2.0,
                      **objective_kw})
  config_lib.validate_config(c)
  ctx = context_lib.build_context(c, jax.devices()[:1])
  params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, c.seed,
                                c.data.seq_len).params
  keys = iter(jax.random.split(jax.random.key(9), 64))
  teacher = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)
  roles = [batch_lib.NEW, batch_lib.REPLAY, batch_lib.NEW, batch_lib.REPLAY]
  b = batch_lib.synthetic_batch(np.random.default_rng(0), len(roles), c.data.seq_len,
                                c.model.vocab_size, roles=tuple(roles))
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  batch["distill_index"] = jnp.asarray(step_lib.distill_index(b["roles"], 1,
                                                              with_replay=True)[0])
  return ctx, params, teacher, batch, c.objective


def _with(obj, **kw):
  """A copy of the objective config `obj` with `kw` set."""
  c = obj.copy_and_resolve_references()
  c.update(kw)
  return c


def test_replay_features_hold_the_replay_rows_block_outputs_near_the_teachers():
  ctx, student, teacher, batch, obj = _model_case(replay_features=2.0)
  fn = objective.make_loss_fn(ctx.apply_fn, obj, 1, features_fn=ctx.features_fn)
  plain = objective.make_loss_fn(ctx.apply_fn, _with(obj, replay_features=0.0), 1)
  frozen = {"teacher": teacher}
  loss, aux = fn(student, batch, frozen)
  loss0, aux0 = plain(student, batch, frozen)
  assert float(aux["replay_features_term"]) > 0 and "replay_features_term" not in aux0
  for key in ("ce_term", "replay_kd_term"):  # the other terms are the plain objective's
    np.testing.assert_allclose(aux[key], aux0[key], rtol=1e-6)
  assert float(loss) > float(loss0)
  # A student equal to its teacher has nothing to hold.
  _, aux_same = fn(teacher, batch, frozen)
  assert abs(float(aux_same["replay_features_term"])) < 1e-9
  # Only the replay rows count: new text in a new row leaves the term alone, in a
  # replay row it does not.
  def with_row(i):
    b = dict(batch)
    b["inputs"] = batch["inputs"].at[i].set((batch["inputs"][i] + 1) % 7)
    return fn(student, b, frozen)[1]["replay_features_term"]
  np.testing.assert_allclose(with_row(0), aux["replay_features_term"], rtol=1e-6)
  assert abs(float(with_row(1)) - float(aux["replay_features_term"])) > 1e-6
  # The term's gradient reaches every block and never the teacher.
  g = jax.grad(lambda p: fn(p, batch, frozen)[0] - plain(p, batch, frozen)[0])(student)
  blocks = [v for k, v in g.items() if k.startswith("layers")]
  assert blocks and all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(blocks))
  g_t = jax.grad(lambda t: fn(student, batch, {"teacher": t})[0])(teacher)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g_t))
  # A margin above every block's drift turns the term off.
  wide = objective.make_loss_fn(ctx.apply_fn, _with(obj, replay_features_margin=1e3), 1,
                                features_fn=ctx.features_fn)
  loss_wide, aux_wide = wide(student, batch, frozen)
  assert float(aux_wide["replay_features_term"]) == 0.0
  np.testing.assert_allclose(loss_wide, loss0, rtol=1e-6)
  with pytest.raises(ValueError, match="objective.replay_features needs the model's block"):
    objective.make_loss_fn(ctx.apply_fn, obj, 1)


def test_replay_features_blocks_hold_only_the_named_blocks():
  ctx, student, teacher, batch, obj = _model_case(replay_features=2.0)
  frozen = {"teacher": teacher}
  def fn(blocks):
    return objective.make_loss_fn(ctx.apply_fn, _with(obj, replay_features_blocks=blocks), 1,
                                  features_fn=ctx.features_fn)
  def term(blocks, params=student):
    return float(fn(blocks)(params, batch, frozen)[1]["replay_features_term"])
  # A student that differs from its teacher above block 0 only: block 0's output is
  # the teacher's, block 1's is not.
  upper_only = dict(teacher, layers_1=student["layers_1"])
  assert abs(term("0", upper_only)) < 1e-9
  assert term("1", upper_only) > 1e-4 and term("-1", upper_only) == term("1", upper_only)
  # Every block (the default) is the mean over the blocks' terms.
  np.testing.assert_allclose(term(""), (term("0") + term("1")) / 2, rtol=1e-5)
  np.testing.assert_allclose(term("0,1"), term(""), rtol=1e-6)
  # Weights make it a weighted mean: block 0 counted three times.
  np.testing.assert_allclose(term("0:3,1"), (3 * term("0") + term("1")) / 4, rtol=1e-5)
  np.testing.assert_allclose(term("1:2,0:2"), term(""), rtol=1e-5)
  # Holding block 0 alone puts no pull on block 1's weights.
  plain = objective.make_loss_fn(ctx.apply_fn, _with(obj, replay_features=0.0), 1)
  g = jax.grad(lambda p: fn("0")(p, batch, frozen)[0] - plain(p, batch, frozen)[0])(student)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g["layers_1"]))
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g["layers_0"]))


@pytest.mark.parametrize("kw,match", [
    ({"replay_kd": 1.0, "replay_features_blocks": "0"},
     r"objective.replay_features_blocks='0' picks the blocks of objective.replay_features=0"),
    ({"replay_kd": 1.0, "replay_features": 1.0, "replay_features_blocks": "0,2"},
     r"replay_features_blocks='0,2': the model has 2 blocks \(model.num_layers\)"),
    ({"replay_kd": 1.0, "replay_features": 1.0, "replay_features_blocks": "-3"},
     r"the model has 2 blocks"),
    ({"replay_kd": 1.0, "replay_features": 1.0, "replay_features_blocks": "1,-1"},
     r"replay_features_blocks='1,-1' names a block twice"),
    ({"replay_kd": 1.0, "replay_features": 1.0, "replay_features_blocks": "lower"},
     r"replay_features_blocks='lower': expected comma-separated block indices"),
    ({"replay_kd": 1.0, "replay_features": 1.0, "replay_features_blocks": "0:x"},
     r"replay_features_blocks='0:x': expected comma-separated block indices"),
    ({"replay_kd": 1.0, "replay_features": 1.0, "replay_features_blocks": "0:0,1"},
     r"replay_features_blocks='0:0,1': block 0's weight 0.0 must be > 0"),
    ({"replay_features": 1.0}, r"objective.replay_features=1.0 compares .* replay_kd > 0"),
    ({"replay_kd": 1.0, "replay_features": -1.0}, r"objective.replay_features=-1.0 and"),
    ({"replay_kd": 1.0, "replay_features_margin": 0.1},
     r"objective.replay_features_margin=0.1 is the margin")])
def test_bad_replay_features_are_named(kw, match):
  c = tiny_config()
  c.train.init_checkpoint = "teacher"
  c.objective.update(kw)
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(c)
