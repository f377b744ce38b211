"""The 'gradient' replay strategy: last-layer alignment against autodiff, selection, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import data as data_lib
from cpt_jax.data import packing
from cpt_jax.replay import gradient as gradient_lib
from cpt_jax.replay import scoring
from cpt_jax.replay import strategies
from cpt_jax.train import context as context_lib
from cpt_jax.train import state as state_lib
from tests.helpers import tiny_config, write_corpus


def _setup(tmp_path, **replay):
  corpus = write_corpus(tmp_path / "corpus", docs=80)
  c = tiny_config()
  c.data.update(corpus_dir=str(corpus), cache_dir=str(tmp_path / "cache"))
  c.sharding.mesh_shape = (1, 1, 1)
  c.replay.update(strategy="gradient", fraction=0.5, selection_fraction=0.5, **replay)
  ctx = context_lib.build_context(c, jax.devices()[:1])
  params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, 0, c.data.seq_len).params
  return c, ctx, params


def _row_grads(ctx, params, batch, vocab):
  """Autodiff: d(row's mean token CE) / d(lm_head kernel), one (D, vocab) matrix per row."""
  def row_loss(kernel, inputs_L, seg_L, pos_L, targets_L, w_L):
    p = dict(params, lm_head=dict(params["lm_head"], kernel=kernel))
    logits = ctx.model.apply({"params": p}, inputs_L[None], seg_L[None], pos_L[None])
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32))
    ce = -jnp.take_along_axis(logp, targets_L[:, None], axis=-1)[:, 0]
    w = w_L.astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
  k = params["lm_head"]["kernel"]
  per_row = jax.jit(jax.vmap(jax.grad(row_loss), in_axes=(None, 0, 0, 0, 0, 0)))(
      k, batch["inputs"], batch["segment_ids"], batch["positions"], batch["targets"],
      batch["loss_weights"])
  return [np.asarray(g).reshape(k.shape[0], -1)[:, :vocab] for g in per_row]


def test_alignment_matches_autodiff_of_the_unembedding(tmp_path):
  c, ctx, params = _setup(tmp_path)
  with data_lib.make_pipeline(c.data, global_batch_size=8) as pipe:
    store = pipe.full_training_store("beta")
    rows = np.arange(6)
    planes = store.gather(rows)
    batch = packing.rows_to_batch(planes, np.zeros((6,), np.int32), np.ones((6,), np.int32),
                                  pipe.start_id)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  vocab = c.model.vocab_size
  grads = _row_grads(ctx, params, batch, vocab)
  fns = gradient_lib.Alignment(ctx.model)
  u = np.random.default_rng(0).normal(size=grads[0].shape).astype(np.float32)
  (dot,) = fns.alignment(params, batch, jnp.asarray(u))
  expected = [float(np.sum(g * u)) for g in grads]
  np.testing.assert_allclose(np.asarray(dot), expected, rtol=2e-4, atol=1e-6)
  total, n = fns.t_gradient(params, batch)
  assert int(n) == 6
  np.testing.assert_allclose(np.asarray(total), sum(grads), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("sign", [True, False])
def test_gradient_strategy_keeps_most_interfered_rows_and_counts_flops(tmp_path, sign):
  c, ctx, params = _setup(tmp_path, grad_batches=2, grad_sign=sign)
  with data_lib.make_pipeline(c.data, global_batch_size=8) as pipe:
    stores = {d: pipe.full_training_store(d) for d in ("beta", "gamma")}
    scorer = scoring.Scorer(ctx.model, ctx.model_cfg, ctx.mesh, ctx.rules, 8, c.data.seq_len)
    t_batches = lambda n: [pipe.training_rows(["alpha"], 8, i) for i in range(n)]
    env = strategies.SelectEnv(stores=stores, seed=0, cfg=c.replay, scorer=scorer,
                               params=params, new_batches=t_batches)
    strat = strategies.get("gradient")
    sel = strat.select(env, 12, 60)
    # Every candidate's score, recomputed with a fresh scorer: the kept rows are each
    # domain's top scores (-alignment), and the scores reported are those.
    check = scoring.Scorer(ctx.model, ctx.model_cfg, ctx.mesh, ctx.rules, 8, c.data.seq_len)
    fns = gradient_lib.Alignment(ctx.model)
    u = gradient_lib.t_direction(check, fns, params, t_batches(2), sign)
    if sign:
      assert set(np.unique(u)) <= {-1.0, 0.0, 1.0}
    cands = strategies.draw_candidates({d: s.num_rows for d, s in stores.items()}, 60, 0)
    for d, r in sel.rows.items():
      all_scores = -np.concatenate([o[0] for _, o in check.map(fns.alignment, params,
                                                                 stores[d], cands[d], u)])
      kept = np.isin(cands[d], r)
      assert kept.sum() == r.size
      assert all_scores[kept].min() >= all_scores[~kept].max() - 1e-5
      np.testing.assert_allclose(np.sort(sel.scores[d]), np.sort(all_scores[kept]), rtol=1e-4)
  assert {d: r.size for d, r in sel.rows.items()} == strategies.split_quota(
      12, {d: s.num_rows for d, s in stores.items()})
  # FLOPs by hand: D = 32, V = 259, L = 32. T: 2 batches x 8 rows x L tokens, each a forward
  # plus 2 D V; candidates: 60 x L tokens, each a forward plus 2 D V + 2 V.
  L, D, V = 32, 32, 259
  fwd = scorer.fwd_flops_tok
  expected = 2 * 8 * L * (fwd + 2 * D * V) + 60 * L * (fwd + 2 * D * V + 2 * V)
  assert scorer.flops == pytest.approx(expected, rel=1e-12)
  # Within what the planner assumes (2 forwards per candidate, 2/3 of training per T token).
  bound = 60 * L * 2 * fwd + strat.fixed_flops(c.replay, 8, L, scorer.train_flops_tok)
  assert scorer.flops <= bound


def test_gradient_batches_key_is_validated():
  from cpt_jax.schema import replay as replay_config  # pylint: disable=g-import-not-at-top
  c = replay_config.default_replay_config()
  c.grad_batches = 0
  with pytest.raises(ValueError, match="replay.grad_batches"):
    replay_config.validate_replay_config(c)
