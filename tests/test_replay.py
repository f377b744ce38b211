"""Replay selection: streaming selectors, planner, selection files, strategies, online resume."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from cpt_jax import stages
from cpt_jax import data as data_lib
from cpt_jax.schema import replay as replay_config
from cpt_jax.replay import planner
from cpt_jax.data import selection as selection_lib
from cpt_jax.replay import strategies
from cpt_jax.replay import streaming
from cpt_jax.train import context as context_lib
from cpt_jax.train import trainer as trainer_lib
from tests.helpers import tiny_config, write_corpus


# ------------------------------------------------------------------ streaming
def _stream(selector, scores, chunk=37):
  keys = np.arange(scores.shape[0])
  for i in range(0, keys.size, chunk):
    selector.add(keys[i:i + chunk], scores[i:i + chunk])


def test_topk_streams_with_bounded_memory():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=5000)
  top = streaming.TopK(25)
  _stream(top, scores)
  keys, got = top.result()
  np.testing.assert_array_equal(np.sort(keys), np.sort(np.argsort(-scores)[:25]))
  assert np.all(np.diff(got) <= 0)
  assert top.peak_held == 25 and top.seen == 5000


def test_quantile_band_keeps_band_with_bounded_memory():
  rng = np.random.default_rng(1)
  scores = rng.uniform(size=20000)
  band = streaming.QuantileBand(50, 0.5, 0.9, sketch=500, seed=0)
  _stream(band, scores)
  keys, got = band.result()
  assert keys.size == 50
  # The thresholds are the band's quantiles of the first `sketch` = 500 scores (exact), and
  # every kept score lies inside them.
  lo, hi = band.thresholds
  assert (lo, hi) == pytest.approx(tuple(np.quantile(scores[:500], [0.5, 0.9])), rel=1e-12)
  assert np.all((got >= lo) & (got <= hi))
  # Random: a q-quantile of n = 500 Uniform(0, 1) draws has std sqrt(q (1 - q) / n) = 0.022
  # (q = 0.5) and 0.013 (q = 0.9); 4 sigma each.
  assert abs(lo - 0.5) < 4 * 0.0224 and abs(hi - 0.9) < 4 * 0.0134
  assert band.peak_held <= 500 + 50 + 37


def test_reservoir_is_uniform_and_bounded():
  res = streaming.Reservoir(100, seed=3)
  _stream(res, np.zeros(10000))
  keys, _ = res.result()
  assert keys.size == 100 and np.unique(keys).size == 100 and res.peak_held == 100
  # Random: the mean of 100 of 0..9999 drawn uniformly has mean 4999.5 and std
  # 10000 / sqrt(12) / sqrt(100) x sqrt(9900 / 9999) = 287; 4 sigma = 1150.
  assert abs(keys.mean() - 4999.5) < 1150


def test_kcenter_coreset_covers_every_cluster():
  rng = np.random.default_rng(2)
  centers = rng.normal(size=(6, 8)) * 10
  x = np.concatenate([c + rng.normal(size=(400, 8)) * 0.1 for c in centers])
  order = rng.permutation(x.shape[0])
  cs = streaming.KCenterCoreset(6, factor=3)
  for i in range(0, x.shape[0], 64):
    idx = order[i:i + 64]
    cs.add(idx, x[idx])
  keys, _ = cs.result()
  assert cs.peak_held <= 18 + 64
  assert len({int(k) // 400 for k in keys}) == 6  # one pick per cluster


def test_keys_and_quotas():
  d, r = streaming.unpack_key(streaming.pack_key(np.array([0, 3]), np.array([5, 2**39])))
  assert d.tolist() == [0, 3] and r.tolist() == [5, 2**39]
  q = strategies.split_quota(10, {"a": 70, "b": 20, "c": 10})
  assert q == {"a": 7, "b": 2, "c": 1}
  assert sum(strategies.split_quota(7, {"a": 3, "b": 3, "c": 3}).values()) == 7
  c = strategies.draw_candidates({"a": 100, "b": 50}, 30, seed=0)
  assert c["a"].size == 20 and c["b"].size == 10 and np.unique(c["a"]).size == 20


# ------------------------------------------------------------------ planner
def _plan(**kw):
  rcfg = replay_config.default_replay_config()
  rcfg.update(strategy=kw.pop("strategy", "teacher_loss"), **kw.pop("rcfg", {}))
  args = dict(rcfg=rcfg, steps=100, batch=8, seq_len=32,
              weights={"t": 1.0, "a": 1.0, "b": 1.0}, roles={"t": "new", "a": "replay",
                                                             "b": "replay"},
              pool_sizes={"a": 3000, "b": 1000}, f_train=3e6, f_fwd=1e6,
              strategy=strategies.get(rcfg.strategy), lambda_kd=0.0, flops_per_second=1e10)
  args.update(kw)
  return planner.plan(**args)


def test_planner_replay_amount_to_mixture_and_candidates():
  p = _plan(rcfg={"fraction": 0.05})
  s = 100 * 8 * 32
  assert p["replay_share"] == pytest.approx(0.05 / 1.05)
  assert p["replay_tokens"] == pytest.approx(0.05 * p["t_tokens"])
  assert p["buffer_rows"] == int(np.ceil(s * 0.05 / 1.05 / 32))
  assert p["tflops"]["selection"] <= 0.05 * p["total_tflops"] + 1e-12
  # By hand: S = 25600 tokens cost 25600 x 3e6 = 0.0768 TF (no teacher); the cap is
  # 0.05 / 0.95 x 0.0768 = 0.0040421 TF, one candidate 32 x 1e6 = 3.2e-5 TF: 126 fit (the
  # teacher_loss minimum, ceil(buffer 39 / band 0.4) = 98, is below), 126 x 3.2e-5 TF.
  assert p["buffer_rows"] == 39 and p["candidates"] == 126
  assert p["tflops"]["selection"] == pytest.approx(0.004032, rel=1e-9)
  w = planner.replay_weights(p, {"t": 1.0, "a": 1.0, "b": 1.0}, {"t": "new", "a": "replay",
                                                                 "b": "replay"},
                             {"a": 30, "b": 10})
  assert w["a"] + w["b"] == pytest.approx(p["replay_share"]) and w["a"] == pytest.approx(3 * w["b"])
  absolute = _plan(rcfg={"tokens": 2560.0})
  assert absolute["replay_tokens"] == pytest.approx(2560.0)
  # replay_kd: the teacher runs on every replay token (forward FLOPs).
  assert p["tflops"]["teacher"] == 0.0
  kd = _plan(rcfg={"fraction": 0.05}, replay_kd=1.0)
  assert kd["tflops"]["teacher"] == pytest.approx(kd["replay_tokens"] * 1e6 / 1e12)


def test_teacher_padding_counts_the_slots_the_step_runs():
  """By hand: 2 teacher rows of 8 in one block run 2 slots (bucket 2); in 8 blocks of one
  row each of the 8 devices runs its bucket of 1 (8 slots for 2 rows); 3 rows in one block
  run a bucket of 4."""
  assert planner.teacher_padding(8, 0.25) == 1.0
  assert planner.teacher_padding(8, 0.25, shards=8) == 4.0
  assert planner.teacher_padding(8, 0.375) == pytest.approx(4 / 3)
  assert planner.teacher_padding(8, 0.375, grad_accum=2, shards=4) == pytest.approx(8 / 3)
  assert planner.teacher_padding(8, 0.0, shards=8) == 1.0
  # 0.4 rows a step on 1 device: a step has 0 or 1 teacher row, a bucket of 1: no padding.
  assert planner.teacher_padding(8, 0.05) == 1.0
  kd1 = _plan(rcfg={"fraction": 0.5}, replay_kd=1.0)
  kd8 = _plan(rcfg={"fraction": 0.5}, replay_kd=1.0, shards=8)
  assert kd8["teacher_padding"] > kd1["teacher_padding"] >= 1.0
  assert kd8["tflops"]["teacher"] == pytest.approx(
      kd8["replay_tokens"] * kd8["teacher_padding"] * 1e6 / 1e12)


def test_planner_fits_online_refreshes_into_the_selection_cap():
  """Fewer, fully useful refreshes rather than refreshes that score no candidate."""
  roomy = _plan(strategy="online", rcfg={"fraction": 0.01, "online_every": 10, "online_pool": 8,
                                         "selection_fraction": 0.5})
  assert roomy["online_refreshes"] == 9 and roomy["online_pool"] == 8
  assert roomy["online_every"] == 10 and not roomy["warnings"]
  # A 20% buffer: re-scoring it at every refresh does not fit 5% of the stage.
  tight = _plan(strategy="online", rcfg={"fraction": 0.2, "online_every": 10, "online_pool": 64,
                                         "online_swap": 0.25, "selection_fraction": 0.3})
  k, pool, every = tight["online_refreshes"], tight["online_pool"], tight["online_every"]
  # By hand: p = 0.2 / 1.2, buffer ceil(25600 p / 32) = 134 rows; T + replay cost 0.0768 TF, the
  # cap 0.3 / 0.7 x 0.0768 = 0.032914 TF = 1028.6 forward rows of 3.2e-5 TF. Less the buffer's
  # M losses (134), k refreshes of 2 n + 134 rows need n = ((1028.6 - 134) / k - 134) / 2 >=
  # ceil(0.25 x 134) = 34: k = 4 (n = 44), every ceil(100 / 5) = 20 steps; rows scored
  # 134 + 4 x (2 x 44 + 134) = 1022, x 3.2e-5 TF.
  assert tight["buffer_rows"] == 134 and (k, pool, every) == (4, 44, 20)
  assert tight["tflops"]["selection"] == pytest.approx(1022 * 3.2e-5, rel=1e-9)
  assert tight["tflops"]["selection"] <= 0.3 / 0.7 * (tight["total_tflops"] - tight[
      "tflops"]["selection"]) * (1 + 1e-9)
  assert "online refreshes" in tight["warnings"][0]
  # online_score 'kl' scores the buffer under M and now at each refresh and keeps no M
  # losses: k refreshes of 2 n + 2 x 134 rows in 1028.6 need n >= 34: k = 3 (n = 37), every
  # ceil(100 / 4) = 25 steps; rows scored 3 x (2 x 37 + 268) = 1026.
  kl = _plan(strategy="online", rcfg={"fraction": 0.2, "online_every": 10, "online_pool": 64,
                                      "online_swap": 0.25, "selection_fraction": 0.3,
                                      "online_score": "kl"})
  assert (kl["online_refreshes"], kl["online_pool"], kl["online_every"]) == (3, 37, 25)
  assert kl["tflops"]["selection"] == pytest.approx(1026 * 3.2e-5, rel=1e-9)
  none = _plan(strategy="online", rcfg={"fraction": 0.2, "online_every": 10,
                                        "selection_fraction": 0.02})
  assert none["online_refreshes"] == 0 and none["online_every"] == 0
  assert none["tflops"]["selection"] == 0  # no refresh: the buffer's M losses are not scored
  assert "stays the random one" in none["warnings"][0]


def test_planner_rejects_budget_below_t_alone():
  with pytest.raises(ValueError, match=r"replay.max_tflops=1e-06 is below what T alone costs"):
    _plan(rcfg={"max_tflops": 1e-6})
  with pytest.raises(ValueError, match=r"replay.max_seconds=0.001 is below what T alone"):
    _plan(rcfg={"max_seconds": 1e-3})
  # A cap that holds T + replay leaves the rest to selection.
  p = _plan(rcfg={"max_tflops": 0.08, "selection_fraction": 1.0})
  assert p["total_tflops"] <= 0.08 + 1e-9 and p["candidates"] > p["buffer_rows"]


# ------------------------------------------------------------------ files + pipeline
def test_selection_file_restricts_replay_domains(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")
  c = tiny_config()
  c.data.update(corpus_dir=str(corpus), cache_dir=str(tmp_path / "cache"))
  with data_lib.make_pipeline(c.data, global_batch_size=8) as pipe:
    names = pipe.store_names()
    n_beta = pipe.full_training_store("beta").num_rows
  sel = selection_lib.write_selection(
      str(tmp_path / "sel"), {"beta": np.array([3, 1]), "gamma": np.array([0])},
      {"beta": np.array([0.5, 0.2]), "gamma": np.array([1.0])}, {"stores": names})
  rows, meta = selection_lib.read_selection(sel)
  assert rows["beta"].tolist() == [1, 3] and meta["rows_per_domain"] == {"beta": 2, "gamma": 1}
  c.data.replay_selection = sel
  with data_lib.make_pipeline(c.data, global_batch_size=8) as pipe:
    assert pipe.mixer.rows_C.tolist() == [pipe.mixer.rows_C[0], 2, 1]
    full = pipe.full_training_store("beta")
    assert full.num_rows == n_beta
    for _ in range(5):
      b = pipe.next_batch()
      for i in np.nonzero(b["domain_ids"] == pipe.domains.index("beta"))[0]:
        assert any(np.array_equal(b["targets"][i], full.gather([r])[0][0]) for r in (1, 3))
  bad = dict(names, beta="beta.train.0000")
  selection_lib.write_selection(str(tmp_path / "bad"), {"beta": np.array([0])}, None,
                                {"stores": bad})
  c.data.replay_selection = str(tmp_path / "bad")
  with pytest.raises(ValueError, match="select again"):
    data_lib.make_pipeline(c.data, global_batch_size=8)


# ------------------------------------------------------------------ strategies end to end
def _config(corpus, tmp_path, strategy, **replay):
  c = tiny_config()
  c.data.update(corpus_dir=str(corpus), cache_dir=str(tmp_path / "cache"))
  c.sharding.mesh_shape = (1, 1, 1)
  c.train.update(steps=4, log_every=2, checkpoint_every=4, eval_batches=1)
  c.replay.update(strategy=strategy, fraction=0.5, selection_fraction=0.5, **replay)
  return c


@pytest.mark.parametrize("strategy", ["random", "forgetting"])
def test_strategy_selects_writes_and_reports_cost(tmp_path, strategy):
  corpus = write_corpus(tmp_path / "corpus", docs=60)
  c = _config(corpus, tmp_path, strategy)
  work = tmp_path / "run"
  summary = stages.train(c, str(work), devices=jax.devices()[:1])
  sel = summary["selection"]
  rows, meta = selection_lib.read_selection(str(work / "replay_selection"))
  plan = meta["plan"]
  assert meta["strategy"] == strategy and meta["unit"] == "packed row"
  # By hand: the stage is S = 4 steps x 8 rows x 32 = 1024 tokens; replay fraction r = 0.5 of T
  # (q_T = 1, no distill domain) gives the share p = 0.5 / 1.5 = 1/3, 1024 / 3 replay tokens
  # and a buffer of ceil(1024 / 3 / 32) = ceil(10.67) = 11 rows (replay.epochs = 1).
  assert plan["replay_share"] == pytest.approx(1 / 3, rel=1e-12)
  assert plan["replay_tokens"] == pytest.approx(1024 / 3, rel=1e-12)
  assert sum(r.size for r in rows.values()) == plan["buffer_rows"] == sel["buffer_rows"] == 11
  # The mixture: alpha keeps 2/3, beta and gamma share 1/3 in proportion to their buffer rows.
  w = summary["data"]["weights"]
  assert w["alpha"] == pytest.approx(2 / 3, rel=1e-12)
  for d in ("beta", "gamma"):
    assert w[d] == pytest.approx(rows[d].size / 11 / 3, rel=1e-12)
  # Realised rows: the mixer gives the replay domains (the last third of the cumulative
  # weights) floor or ceil of 8 / 3 rows each step, 2 or 3, so 8..12 of the 32 rows. Their
  # token share is not fixed: packed rows are only partly full (~80% here).
  n = summary["data"]["rows_per_domain"]
  assert 8 <= n["beta"] + n["gamma"] <= 12 and n["alpha"] == 32 - n["beta"] - n["gamma"]
  tok = summary["data"]["tokens_per_role"]
  assert 0 < tok["replay"] <= 32 * (n["beta"] + n["gamma"])
  if strategy in ("random", "proportional"):
    assert sel["tflops"] == 0.0 and plan["candidates"] == 0
  else:
    # By hand (forgetting): the cap, 0.5 / 0.5 x the stage's 1024 train tokens, is all taken by
    # the fixed look-ahead (4 steps x 8 rows x 32 = 1024 train tokens), so the planner scores
    # the minimum, the 11 buffer rows, twice (before and after the look-ahead): 704 forward
    # tokens, each 1/3 of a training token's FLOPs (f_train from the stage's 1024 tokens).
    f_train = summary["train_tflops"] * 1e12 / 1024
    expected = (2 * 11 * 32 * f_train / 3 + 4 * 8 * 32 * f_train) / 1e12
    assert plan["candidates"] == sel["candidates"] == 11 and sel["tokens"] == 704
    assert sel["tflops"] == pytest.approx(expected, rel=1e-9)
    assert plan["tflops"]["selection"] == pytest.approx(expected, rel=1e-9)
    assert sel["peak_held"] <= plan["candidates"]  # per-domain top-k of its 11 candidates
  assert set(sel["actual"]["tflops"]) == {"selection", "new", "replay", "teacher"}
  with open(work / "replay_selection" / "selection.jsonl") as f:
    first = json.loads(f.readline())
  assert set(first) == {"domain", "row", "score"}


@pytest.mark.parametrize("strategy", ["proportional", "teacher_loss", "diversity",
                                      "forgetting"])
def test_strategy_interface_bounded_and_costed(tmp_path, strategy):
  """Each strategy through the common interface, on M = a fresh tiny model."""
  from cpt_jax.replay import scoring  # pylint: disable=g-import-not-at-top
  from cpt_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  corpus = write_corpus(tmp_path / "corpus", docs=80)
  c = _config(corpus, tmp_path, strategy, sketch_rows=16)
  ctx = context_lib.build_context(c, jax.devices()[:1])
  params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, 0, c.data.seq_len).params
  with data_lib.make_pipeline(c.data, global_batch_size=8) as pipe:
    stores = {d: pipe.full_training_store(d) for d in ("beta", "gamma")}
    scorer = scoring.Scorer(ctx.model, ctx.model_cfg, ctx.mesh, ctx.rules, 8, c.data.seq_len)
    env = strategies.SelectEnv(stores=stores, seed=0, cfg=c.replay, scorer=scorer, params=params,
                               new_batches=lambda n: [pipe.training_rows(["alpha"], 8, i)
                                                      for i in range(n)], lookahead_lr=3e-3)
    strat = strategies.get(strategy)
    sel = strat.select(env, 12, 60)
  sizes = {d: s.num_rows for d, s in stores.items()}
  assert sel.num_rows == 12
  assert {d: r.size for d, r in sel.rows.items()} == strategies.split_quota(12, sizes)
  for d, r in sel.rows.items():
    assert np.unique(r).size == r.size and r.max() < sizes[d]
  if strategy == "proportional":
    assert scorer.flops == 0
    return
  assert sel.candidates == 60
  fwd = strat.forwards_per_candidate
  # Scored rows: every candidate (padded batches per domain count real rows only).
  assert scorer.rows_scored == fwd * 60
  expected = fwd * 60 * c.data.seq_len * scorer.fwd_flops_tok + strat.fixed_flops(
      c.replay, 8, c.data.seq_len, scorer.train_flops_tok)
  assert scorer.flops == pytest.approx(expected)
  assert sel.peak_held < 60 or strategy == "teacher_loss"
  if strategy == "teacher_loss":
    for d, (lo, hi) in sel.info["band_thresholds"].items():
      assert np.all((sel.scores[d] >= lo) & (sel.scores[d] <= hi))
  if strategy == "forgetting":
    assert np.isfinite(np.concatenate(list(sel.scores.values()))).all()


def test_scorer_divergences_are_the_per_row_kl_of_the_two_models(tmp_path):
  """KL(ref || params) per row at a temperature, against scipy on the models' logits."""
  from scipy import special  # pylint: disable=g-import-not-at-top
  from cpt_jax.replay import scoring  # pylint: disable=g-import-not-at-top
  from cpt_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  corpus = write_corpus(tmp_path / "corpus", docs=40)
  c = _config(corpus, tmp_path, "online")
  ctx = context_lib.build_context(c, jax.devices()[:1])
  init = lambda seed: state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, seed,
                                           c.data.seq_len).params
  params, ref = init(0), init(1)
  rows = np.arange(11)  # a full batch of 8 and a padded one of 3
  with data_lib.make_pipeline(c.data, global_batch_size=8) as pipe:
    store = pipe.full_training_store("beta")
    scorer = scoring.Scorer(ctx.model, ctx.model_cfg, ctx.mesh, ctx.rules, 8, c.data.seq_len)
    got = scorer.divergences(params, ref, store, rows, temperature=2.0)
    assert (scorer.rows_scored, scorer.rows_run) == (22, 32)  # two forwards a row
    same = scorer.divergences(ref, ref, store, rows, temperature=2.0)
    logits = jax.jit(lambda p, b: (ctx.model.apply({"params": p}, b["inputs"], b["segment_ids"],
                                                   b["positions"]), b["loss_weights"]))
    want = []
    for (_, (s_BxLxV, w_BxL)), (_, (t_BxLxV, _)) in zip(
        scorer.map(logits, params, store, rows), scorer.map(logits, ref, store, rows)):
      logp_t = special.log_softmax(t_BxLxV.astype(np.float64) / 2.0, axis=-1)
      logp_s = special.log_softmax(s_BxLxV.astype(np.float64) / 2.0, axis=-1)
      kl_BxL = special.rel_entr(np.exp(logp_t), np.exp(logp_s)).sum(-1)
      want.append((kl_BxL * w_BxL).sum(-1) / w_BxL.sum(-1))
  np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-4, atol=1e-7)
  assert got.shape == (11,) and np.all(got > 1e-4)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


@pytest.mark.parametrize("decomposition,score", [("", "loss"), ("lora", "loss"), ("", "kl")])
def test_online_refresh_survives_resume(tmp_path, decomposition, score):
  """Resume re-scores against M rebuilt as at the start (no teacher is kept here)."""
  corpus = write_corpus(tmp_path / "corpus", docs=60)
  c = _config(corpus, tmp_path, "online", online_every=2, online_pool=40, online_swap=0.5,
              online_score=score)
  c.train.update(steps=8, checkpoint_every=4, log_every=2)
  c.decomposition.mode = decomposition
  ref = stages.train(c, str(tmp_path / "ref"), devices=jax.devices()[:1])
  # 'kl' scores the buffer under M at each refresh: half the stage holds 2 of them.
  assert ref["selection"]["online"]["refreshes"] == (3 if score == "loss" else 2)
  assert ref["selection"]["online"]["swaps"] > 0
  assert ref["selection"]["tflops"] > 0

  class Crash(Exception):
    pass

  def crash(step, record, pipeline):
    if step == 6:
      raise Crash()

  with pytest.raises(Crash):
    stages.train(c, str(tmp_path / "run"), devices=jax.devices()[:1], on_metrics=crash)
  out = stages.train(c, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert out["init"] == "resumed from step 4"
  assert out["selection"]["online"] == ref["selection"]["online"]
  np.testing.assert_allclose(out["eval"]["alpha"]["loss"], ref["eval"]["alpha"]["loss"],
                             rtol=1e-5)


def test_invalid_replay_config_names_the_key():
  from cpt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.replay.strategy = "nope"
  with pytest.raises(ValueError, match="replay.strategy"):
    config_lib.validate_config(c)
  c.replay.update(strategy="online", online_score="entropy")
  with pytest.raises(ValueError, match="replay.online_score"):
    config_lib.validate_config(c)
  c.replay.online_score = "kl"
  c.replay.update(strategy="random", band_low=0.9, band_high=0.5)
  with pytest.raises(ValueError, match="replay.band_low"):
    config_lib.validate_config(c)
