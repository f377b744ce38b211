"""Strategy 'dro': rows drawn ~ exp(M's loss / temperature) (IR-DRO weights), FLOPs counted."""

import jax
import numpy as np
import pytest

from cpt_jax import data as data_lib
from cpt_jax.replay import dro
from cpt_jax.replay import scoring
from cpt_jax.replay import strategies
from cpt_jax.schema import replay as replay_config
from cpt_jax.train import context as context_lib
from cpt_jax.train import state as state_lib
from tests.helpers import tiny_config, write_corpus


def test_weights_by_hand():
  # Losses 1, 2 at temperature 1: e / (e + e^2) and e^2 / (e + e^2).
  np.testing.assert_allclose(dro.weights(np.array([1.0, 2.0]), 1.0),
                             [1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-12)
  # Large temperature: uniform; small: all on the largest loss.
  np.testing.assert_allclose(dro.weights(np.array([1.0, 3.0, 2.0]), 1e6), [1 / 3] * 3, rtol=1e-5)
  np.testing.assert_allclose(dro.weights(np.array([1.0, 3.0, 2.0]), 1e-3), [0, 1, 0], atol=1e-12)


def test_gumbel_top1_draws_follow_the_weights():
  # The top key of 20,000 independent key draws lands on each row about w_i of the time.
  loss = np.array([0.5, 1.0, 1.5, 2.0])
  rng = np.random.default_rng(0)
  wins = np.bincount([int(np.argmax(dro.gumbel_keys(loss, 0.5, rng))) for _ in range(20000)],
                     minlength=4) / 20000
  expected = np.exp(loss / 0.5) / np.exp(loss / 0.5).sum()  # 0.032, 0.087, 0.237, 0.644
  np.testing.assert_allclose(wins, expected, atol=0.01)


def test_dro_strategy_draws_high_loss_rows_and_counts_one_forward_each(tmp_path):
  corpus = write_corpus(tmp_path / "corpus", docs=80)
  c = tiny_config()
  c.data.update(corpus_dir=str(corpus), cache_dir=str(tmp_path / "cache"))
  c.sharding.mesh_shape = (1, 1, 1)
  c.replay.update(strategy="dro", fraction=0.5, selection_fraction=0.5)
  ctx = context_lib.build_context(c, jax.devices()[:1])
  params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, 0, c.data.seq_len).params
  with data_lib.make_pipeline(c.data, global_batch_size=8) as pipe:
    stores = {d: pipe.full_training_store(d) for d in ("beta", "gamma")}
    sizes = {d: s.num_rows for d, s in stores.items()}
    cands = strategies.draw_candidates(sizes, 60, 0)
    check = scoring.Scorer(ctx.model, ctx.model_cfg, ctx.mesh, ctx.rules, 8, c.data.seq_len)
    losses = {d: check.losses(params, stores[d], cands[d]) for d in stores}
    picked = {}
    for t in (1e-4, 1e4):
      scorer = scoring.Scorer(ctx.model, ctx.model_cfg, ctx.mesh, ctx.rules, 8, c.data.seq_len)
      env = strategies.SelectEnv(stores=stores, seed=0, cfg=c.replay, scorer=scorer,
                                 params=params)
      c.replay.dro_temperature = t
      sel = strategies.get("dro").select(env, 12, 60)
      assert {d: r.size for d, r in sel.rows.items()} == strategies.split_quota(12, sizes)
      # One forward per candidate, nothing else: 60 rows x L tokens x forward FLOPs.
      assert scorer.flops == pytest.approx(60 * c.data.seq_len * scorer.fwd_flops_tok)
      picked[t] = sel.rows
  for d in stores:
    kept = np.isin(cands[d], picked[1e-4][d])
    # Near zero temperature: the domain's highest-loss candidates.
    assert losses[d][kept].min() >= losses[d][~kept].max() - 1e-6
  # A huge temperature draws (nearly) uniformly: not the same top-loss set.
  assert any(not np.array_equal(picked[1e4][d], picked[1e-4][d]) for d in stores)


def test_dro_temperature_is_validated():
  c = replay_config.default_replay_config()
  c.dro_temperature = 0.0
  with pytest.raises(ValueError, match="replay.dro_temperature"):
    replay_config.validate_replay_config(c)
  c = replay_config.default_replay_config()
  c.steer_quota = 1.5
  with pytest.raises(ValueError, match="replay.steer_quota"):
    replay_config.validate_replay_config(c)
