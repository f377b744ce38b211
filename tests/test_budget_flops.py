"""The stage budget counts every FLOP (padding, rate measurement, Fisher, reference forwards)
and looks ahead to a scheduled online refresh."""

import jax
import numpy as np
import pytest

from cpt_jax import stages
from cpt_jax import data as data_lib
from cpt_jax.model.transformer import ModelConfig, flops_per_token
from cpt_jax.replay import scoring
from cpt_jax.data import selection as selection_lib
from cpt_jax.train import context as context_lib
from cpt_jax.train import budget as budget_lib
from cpt_jax.train import state as state_lib
from cpt_jax.train import trainer as trainer_lib
from tests.helpers import tiny_config, write_corpus


def _fwd_row(c):
  """One packed row's forward FLOPs (seq_len x forward FLOPs/token)."""
  return c.data.seq_len * flops_per_token(ModelConfig.from_config(c.model), c.data.seq_len,
                                          training=False)


def _base_config(tmp_path):
  c = tiny_config()
  c.data.update(corpus_dir=str(write_corpus(tmp_path / "corpus", docs=60)),
                cache_dir=str(tmp_path / "cache"))
  c.sharding.mesh_shape = (1, 1, 1)
  return c


def test_scorer_counts_padding_and_the_rate_measurement(tmp_path):
  c = _base_config(tmp_path)
  ctx = context_lib.build_context(c, jax.devices()[:1])
  params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, 0, c.data.seq_len).params
  row = _fwd_row(c)
  with data_lib.make_pipeline(c.data, global_batch_size=8) as pipe:
    store = pipe.full_training_store("beta")
    sc = scoring.Scorer(ctx.model, ctx.model_cfg, ctx.mesh, ctx.rules, 8, c.data.seq_len)
    assert sc.losses(params, store, np.arange(13)).shape == (13,)
    # 13 rows run as 2 batches of 8: 16 rows' forwards, 13 of them asked for.
    assert sc.flops == pytest.approx(13 * row)
    assert sc.run_flops == pytest.approx(16 * row)
    sc.measure_rate(params, store, np.arange(5))  # 2 batches of 8 (compile + timed)
    assert sc.flops == pytest.approx(13 * row)
    assert sc.run_flops == pytest.approx((16 + 16) * row)
    again = scoring.Scorer(ctx.model, ctx.model_cfg, ctx.mesh, ctx.rules, 8, c.data.seq_len)
    again.add_counters(sc.counters())  # a resume adds the checkpointed counts
    assert again.run_flops == pytest.approx(32 * row)


def test_fisher_pass_and_reference_forwards_count_in_the_usage(tmp_path):
  c = _base_config(tmp_path)
  c.objective.update(ewc=1.0, ewc_batches=3)
  c.train.init_checkpoint = "unused"  # only satisfies validation: the usage is read directly
  c.replay.max_tflops = 1e9
  trainer = stages.make_trainer(c, str(tmp_path / "run"), devices=jax.devices()[:1])
  try:
    L = c.data.seq_len
    f_train = flops_per_token(trainer.ctx.model_cfg, L, training=True)
    fisher = 3 * 8 * L * f_train / 1e12  # ewc_batches x global_batch_size rows, fwd + bwd
    use = trainer._usage(0)  # pylint: disable=protected-access
    assert use.parts["fisher"] == pytest.approx(fisher)
    assert use.tflops == pytest.approx(fisher)
    params = state_lib.init_state(trainer.ctx.model, trainer.ctx.layout, trainer.ctx.state_sh, 0,
                                  L).params
    trainer.reference_losses(params)  # alpha (new), beta and gamma (replay): 8 rows each
    ref = 3 * 8 * _fwd_row(c) / 1e12
    use = trainer._usage(0)  # pylint: disable=protected-access
    assert use.parts["reference"] == pytest.approx(ref)
    assert use.tflops == pytest.approx(fisher + ref) == pytest.approx(use.fixed_tflops)
    later = budget_lib.StageBudget(max_tflops=1e9)  # the count survives a restart
    later.load_state_dict(trainer.budget.state_dict(seconds_used=1.0))
    assert later.counted["reference"] == pytest.approx(ref)
  finally:
    trainer.close()


def test_budget_pace_leaves_one_off_work_out_and_looks_ahead():
  b = budget_lib.StageBudget(max_tflops=31.0)
  b.start_window(budget_lib.Usage(step=0, seconds=0.0, tflops=5.0, fixed_tflops=5.0))
  # 10 steps at 1 TFLOP each plus a 3-TFLOP refresh; a 4-TFLOP refresh is due next window.
  use = budget_lib.Usage(step=10, seconds=1.0, tflops=18.0, fixed_tflops=8.0,
                         lookahead=lambda n: (4.0, 0.0) if n == 10 else (0.0, 0.0))
  why = b.check(use, next_steps=10)  # needs 18 + 10 + 4 = 32 > 31
  assert why.startswith("replay.max_tflops=31") and "~14 more" in why
  b2 = budget_lib.StageBudget(max_tflops=32.0)
  b2.start_window(budget_lib.Usage(step=0, seconds=0.0, tflops=5.0, fixed_tflops=5.0))
  assert b2.check(use, next_steps=10) == ""


@pytest.mark.parametrize("score", ["loss", "kl"])
def test_online_refresh_past_the_cap_stops_the_stage_before_it(tmp_path, score):
  """Refreshes at steps 4 and 8; the cap holds everything up to step 8's refresh."""
  c = _base_config(tmp_path)
  c.data.replay = "beta"  # one replay domain: its candidates fill whole scoring batches
  c.train.update(steps=10, global_batch_size=2, log_every=2, checkpoint_every=4,
                 eval_batches=1)
  c.replay.update(strategy="online", fraction=0.5, selection_fraction=0.9, online_every=4,
                  online_pool=16, online_swap=0.5, score_batch=8, online_score=score)
  L, gbs, B, P = c.data.seq_len, 2, 8, 16
  row = _fwd_row(c)
  step = gbs * L * flops_per_token(ModelConfig.from_config(c.model), L, training=True)
  pad = lambda n: -(-n // B) * B

  # Forwards of a buffer row: 'loss' runs it under M once, then under the model now at
  # each refresh; 'kl' runs it under both at each refresh.
  once, per = (1, 1) if score == "loss" else (0, 2)

  def used(steps, refreshes, buf, measures=1):
    # Rate measurement 2 batches, the buffer's passes, per refresh the P candidates under
    # M and now (a buffer of <= 7 rows leaves >= 9 of the 16 rows of d's rolling window as
    # candidates: 2 whole batches either way).
    return (steps * step + (measures * 2 * B + once * pad(buf)
                            + refreshes * (per * pad(buf) + 2 * P)) * row) / 1e12

  # Planner's view (rows asked for): once x buffer + 2 refreshes x (2 P + per x buffer)
  # must fit, so the cap is >= 10 steps + (4 P + 3 buf) rows ('loss'; 'kl': 4 P + 4 buf);
  # with 7 buffer rows that is below used(8, 2) = 8 steps + 104 rows ('kl': 112; 2 steps
  # are 12 rows here).
  buf = 7
  lo, hi = (10 * step + (4 * P + (once + 2 * per) * buf) * row) / 1e12, used(8, 2, buf)
  assert lo < hi
  c.replay.max_tflops = (lo + hi) / 2
  dev = jax.devices()[:1]

  class Crash(Exception):
    pass

  def crash(s, record, pipeline):
    if s == 6:
      raise Crash()

  with pytest.raises(Crash):
    stages.train(c, str(tmp_path / "run"), devices=dev, on_metrics=crash)
  rows, meta = selection_lib.read_selection(str(tmp_path / "run" / "replay_selection"))
  assert rows["beta"].size == buf
  plan = meta["plan"]
  assert (plan["online_refreshes"], plan["online_every"], plan["online_pool"]) == (2, 4, P)
  out = stages.train(c, str(tmp_path / "run"), devices=dev)  # resumed from step 4
  assert out["init"] == "resumed from step 4"
  b = out["budget"]
  # At step 6 the next window holds step 8's refresh, which would pass the cap.
  assert b["stopped_at"] == 6 and out["step"] == 6
  assert out["selection"]["online"]["refreshes"] == 1
  # Both invocations measured the scoring rate; the checkpoint carried the first's counts.
  assert b["tflops_used"] == pytest.approx(used(6, 1, buf, measures=2))
  assert b["tflops_by_part"]["selection"] == pytest.approx(used(0, 1, buf, measures=2))
  assert b["tflops_used"] <= c.replay.max_tflops < used(8, 2, buf, measures=2)
