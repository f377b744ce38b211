"""benchmarks/cpt_suite.py --quick runs end to end (on a synthetic corpus, tiny steps)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
import suite_lib as suite  # benchmarks/ is on sys.path (conftest)
import suite_pareto
import suite_search
from tests.helpers import write_corpus


CPT_STEPS, BATCH, SEQ_LEN = 80, 16, 64  # --cpt-steps; suite.quick's batch and seq_len
GRID_ROWS = ["no_replay", "random_0.05", "teacher_loss_0.05", "online_0.05", "steered_0.05",
             "random_0.05+distill", "joint", "random_0.05+kd"]
# random_0.05+full is random_0.05 (decomposition.mode '' is the default): not run twice.
EXTRA_ROWS = ["online_0.05+kd", "random_0.05+forgetting", "random_0.05+lora_tau",
              "random_0.05+sigma_tau_routing"]


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
  """One `cpt_suite.py --quick` run shared by the tests below: (its JSON, stdout, out dir).

  The grid's rows at 5% (teacher_loss, online and steered strategies) plus the kd, controller and
  decomposition extras; one subprocess, one M, one data cache for all of them.
  """
  import os  # pylint: disable=g-import-not-at-top
  tmp_path = tmp_path_factory.mktemp("quick_suite")
  corpus = write_corpus(tmp_path / "corpus", domains=("alpha", "beta", "gamma", "delta", "eps"),
                        docs=80)
  out = tmp_path / "out.json"
  cmd = [sys.executable, str(REPO / "benchmarks" / "cpt_suite.py"), "--quick",
         "--corpora", str(corpus), "--json", str(out), "--cache", str(tmp_path / "cache"),
         "--old", "alpha,beta,gamma,delta", "--new", "eps", "--unavailable", "gamma",
         "--pretrain-steps", "10", "--cpt-steps", str(CPT_STEPS),
         "--strategies", "teacher_loss,online,steered", "--extras", "kd,controllers,decomposition",
         "--kd-strategies", "random,online", "--only", ",".join(GRID_ROWS + EXTRA_ROWS)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PATH="/usr/bin:/bin", XLA_FLAGS="")
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return json.loads(out.read_text()), res.stdout, tmp_path


def test_cpt_suite_quick_is_fair(quick_suite):
  """Every row trains on the same T tokens; no_replay replays nothing; selection within its cap.

  forgetting is left out: at this scale its fixed look-ahead (4 train steps) plus one scored
  pass over the buffer's candidates exceed 5% of an 84-step stage (the planner warns).
  """
  import math  # pylint: disable=g-import-not-at-top
  data, stdout, tmp_path = quick_suite
  cpt_steps, batch, seq_len = CPT_STEPS, BATCH, SEQ_LEN
  names = [r["name"] for r in data["rows"]]
  assert names == GRID_ROWS + EXTRA_ROWS
  rows = {r["name"]: r for r in data["rows"] if r["name"] in GRID_ROWS}
  for r in data["rows"]:
    assert set(r["old_loss"]) == {"alpha", "beta", "gamma", "delta"}
  # no_replay: 80 steps x 16 rows, every row from T, none replayed.
  nr = rows["no_replay"]
  assert nr["t_rows"] == cpt_steps * batch == 1280
  assert nr["replay_tokens"] == 0 and nr["replay_fraction_actual"] == 0.0
  assert 0 < nr["t_tokens"] <= 1280 * seq_len
  assert all(r["replay_tokens"] > 0 for n, r in rows.items() if n != "no_replay")
  # Equal T: the other rows run more steps so that their T rows stay 1280. Slack: rounding
  # train.steps moves at most half a step of <= 16 T rows (8), and the mixer's per-step T
  # count is floor or ceil of 16 x T's share, so the sum over N steps has a standard
  # deviation <= sqrt(N) / 2: 4 sigma = 2 sqrt(N) (the joint row, N ~ 230: 38 rows, 3%).
  # Leaving out the (1 + r) step factor would cost 1280 x 0.05 / 1.05 = 61 rows.
  for n, r in rows.items():
    slack = 0.5 * batch + 2 * math.sqrt(r["steps"])
    assert abs(r["t_rows"] - 1280) <= slack, (n, r["t_rows"], slack)
    # Every row reads the same T stream (same seed), so rows apart -> at most L tokens each.
    assert abs(r["t_tokens"] - nr["t_tokens"]) <= slack * seq_len, (n, r["t_tokens"])
  # Selection: zero without scoring, and at most replay.selection_fraction of the stage.
  assert rows["teacher_loss_0.05"]["selection_tflops"] > 0
  assert rows["online_0.05"]["selection_tflops"] > 0
  for n, r in rows.items():
    if r["strategy"] in ("random", "no_replay", "joint", "steered"):  # steered: no forward
      assert r["selection_tflops"] == 0, n
    assert r["selection_fraction"] == 0.05
    # The planner fills the cap with whole candidates, so it may be met exactly (1e-9: float).
    assert r["selection_tflops"] <= 0.05 * r["total_tflops"] * (1 + 1e-9), n
  assert rows["random_0.05+kd"]["teacher_tflops"] > 0 == rows["random_0.05"]["teacher_tflops"]
  assert "| teacher_loss_0.05 |" in stdout
  # Dev / test: every row carries both; M was evaluated on every domain's two parts.
  assert {f"{d}__dev" for d in ("alpha", "beta", "gamma", "delta", "eps")} <= set(data["m_loss"])
  for r in data["rows"]:
    assert set(r["dev_forgetting"]) == {"alpha", "beta", "gamma", "delta"}
    assert r["dev_mean_forgetting"] == sum(r["dev_forgetting"].values()) / 4
  # The Pareto view: each table row flagged, the plot next to the JSON.
  assert set(data["pareto"]["rows"]) == set(names)
  assert all("beats_random_at" in r for r in data["table"])
  assert (tmp_path / "out_pareto.png").stat().st_size > 1000


def test_cpt_suite_kd_controller_and_decomposition_rows(quick_suite):
  rows = {r["name"]: r for r in quick_suite[0]["rows"] if r["name"] in EXTRA_ROWS}
  assert set(rows) == set(EXTRA_ROWS)
  assert rows["online_0.05+kd"]["teacher_tflops"] > 0  # online rows distilled from M too
  assert suite.decomposition_variants()["full"] == {"decomposition.mode": ""}
  full = next(r for r in quick_suite[0]["rows"] if r["name"] == "random_0.05")  # = +full
  lora = rows["random_0.05+lora_tau"]
  assert lora["trainable_params"] < full["trainable_params"]
  assert lora["optimizer_bytes"] < full["optimizer_bytes"]
  assert all(r["seconds_per_step"] > 0 for r in rows.values())


def test_kd_rows_name_their_strategy_and_non_default_weight():
  names = lambda s: [r["name"] for r in suite.run_specs(s) if "+kd" in r["name"]]
  assert names(suite.Settings(corpora="x")) == ["random_0.01+kd"]
  s = suite.Settings(corpora="x", kd_strategies=("random", "online"), kd_weight=2.0)
  assert names(s) == ["random_0.01+kd2", "online_0.01+kd2"]  # never mixed with weight 4's cache
  assert {r["replay_kd"] for r in suite.run_specs(s) if "+kd" in r["name"]} == {2.0}


# ------------------------------------------------------------------ row cache
def _stub_suite(monkeypatch, tmp_path):
  """run_suite without training: M and the pools stubbed; returns the list of trained runs."""
  import os  # pylint: disable=g-import-not-at-top
  m_loss = {"a": 3.0, "b": 3.0, "t": 5.0}
  monkeypatch.setattr(suite, "pretrain", lambda s: (str(tmp_path / "m"), m_loss))
  monkeypatch.setattr(suite, "_pool_rows", lambda s: {"a": 30, "b": 30, "t": 20})
  trained = []

  def train(c, work, devices=None):
    os.makedirs(work, exist_ok=True)
    # What a checkpoint of this run directory would be: a re-run under a new key must not
    # find (and resume from) the stale one.
    assert not os.path.exists(os.path.join(work, "stale_checkpoint"))
    open(os.path.join(work, "stale_checkpoint"), "w").close()
    trained.append(os.path.basename(work))
    return {"eval": {d: {"loss": 2.0} for d in m_loss}, "teacher_tflops": 0.0,
            "train_tflops": 1.0, "steps_run": c.train.steps, "seconds": 1.0,
            "data": {"tokens_per_role": {"new": 100, "replay": 0},
                     "tokens_per_domain": {"t": 100}, "rows_per_domain": {"t": 2}}}

  monkeypatch.setattr(suite.stages, "train", train)
  s = suite.Settings(corpora=str(tmp_path), old=("a", "b"), new="t", unavailable="b",
                     cache=str(tmp_path / "cache"), only="no_replay,joint", seeds=1, workers=1,
                     extras=(), dev_share=0.0)  # no corpus here: no dev / test split
  return suite, s, trained


def test_cached_row_is_reused_only_under_the_same_config_and_code(tmp_path, monkeypatch):
  import dataclasses  # pylint: disable=g-import-not-at-top
  suite, s, trained = _stub_suite(monkeypatch, tmp_path)
  first = suite.run_suite(s, log=lambda m: None)["rows"]
  assert trained == ["no_replay-s0", "joint-s0"]
  assert suite.run_suite(s, log=lambda m: None)["rows"] == first  # nothing changed: reused
  assert len(trained) == 2
  # A setting that changes every row's config (not in the pretrain key): both re-run.
  suite.run_suite(dataclasses.replace(s, cpt_lr=1e-3), log=lambda m: None)
  assert trained[2:] == ["no_replay-s0", "joint-s0"]
  suite.run_suite(dataclasses.replace(s, cpt_lr=1e-3), log=lambda m: None)
  assert len(trained) == 4
  # One row's config override changes: that row re-runs, the other is reused.
  specs = suite.run_specs

  def with_override(settings):
    out = specs(settings)
    out[0]["overrides"] = {"optimizer.weight_decay": 0.5}
    return out

  monkeypatch.setattr(suite, "run_specs", with_override)
  suite.run_suite(dataclasses.replace(s, cpt_lr=1e-3), log=lambda m: None)
  assert trained[4:] == ["no_replay-s0"]
  # The code version changes: every row re-runs.
  monkeypatch.setattr(suite, "code_version", lambda: "another-version")
  suite.run_suite(dataclasses.replace(s, cpt_lr=1e-3), log=lambda m: None)
  assert trained[5:] == ["no_replay-s0", "joint-s0"]


def test_code_version_hashes_the_sources(tmp_path):
  (tmp_path / "pkg" / "sub").mkdir(parents=True)
  (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
  (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
  (tmp_path / "pkg" / "notes.txt").write_text("not code")
  before = suite.source_hash(str(tmp_path / "pkg"))
  (tmp_path / "pkg" / "notes.txt").write_text("still not code")
  assert suite.source_hash(str(tmp_path / "pkg")) == before
  (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
  assert suite.source_hash(str(tmp_path / "pkg")) != before
  assert suite.code_version() == suite.code_version()


# ------------------------------------------------------------------ dev / test split
def test_split_documents_is_deterministic_disjoint_and_balanced():
  lines = [json.dumps({"id": f"doc{i}", "text": "x"}) + "\n" for i in range(10)]
  dev, test = suite.split_documents(lines, 0.5)
  assert len(dev) == 5 and len(test) == 5
  assert sorted(dev + test) == sorted(lines)
  assert [l for l in lines if l in dev] == dev  # file order kept
  assert suite.split_documents(list(reversed(lines)), 0.5)[0] == list(reversed(dev))  # by id
  # A document's part depends on its id only, not on its neighbours.
  dev3, _ = suite.split_documents(lines[:3], 0.34)
  assert len(dev3) == 1
  assert suite.split_documents(lines[:1], 0.5) == ([], lines[:1])  # one doc: all test
  assert len(suite.split_documents(lines[:2], 0.01)[0]) == 1  # each part gets one of two


def test_split_corpus_writes_dev_and_test_parts(tmp_path):
  corpus = write_corpus(tmp_path / "corpus", domains=("a", "b", "t"), docs=80)
  s = suite.Settings(corpora=str(corpus), old=("a", "b"), new="t", unavailable="b",
                     cache=str(tmp_path / "cache"))
  out = suite.split_corpus(s)
  assert suite.split_corpus(s) == out  # built once
  for d in ("a", "b", "t"):
    orig = (corpus / d / "validation.jsonl").read_text().splitlines()
    test = (tmp_path / out / d / "validation.jsonl").read_text().splitlines()
    dev = (tmp_path / out / f"{d}__dev" / "validation.jsonl").read_text().splitlines()
    assert sorted(dev + test) == sorted(orig) and not set(dev) & set(test)
    assert len(orig) == 10 and len(dev) == 5  # write_corpus: 80 // 8 validation docs
    assert (tmp_path / out / d / "train.jsonl").read_text() == \
        (corpus / d / "train.jsonl").read_text()
    assert not (tmp_path / out / f"{d}__dev" / "train.jsonl").exists()  # eval-only
  assert suite.split_corpus(suite.dataclasses.replace(s, dev_share=0)) == str(corpus)
  # The cache follows the files' contents: a fresh copy (new mtimes) finds it, an edit not.
  for d in ("a", "b", "t"):
    for split in ("train", "validation"):
      path = corpus / d / f"{split}.jsonl"
      text = path.read_text()
      path.unlink()
      path.write_text(text)
      os.utime(path, ns=(1, 1))
  assert suite.split_corpus(s) == out
  with open(corpus / "t" / "validation.jsonl", "a") as f:
    f.write('{"text": "one more document"}\n')
  assert suite.split_corpus(s) != out


# ------------------------------------------------------------------ dev search
def test_successive_halving_chooses_on_dev_within_the_run_budget():
  """Four candidates; dev prefers a (test prefers d). Budget 8: rung 0 = 4 + ref, keeps 2;
  rung 1 = 2 + ref, keeps 1; then it stops (8 runs)."""
  # (dev forgetting, dev gain, test forgetting) per candidate; ref dev gain 1.00.
  vals = {"a": (0.50, 1.00, 0.70), "b": (0.55, 1.00, 0.60), "c": (0.40, 0.95, 0.50),
          "d": (0.60, 0.995, 0.10)}
  grid = [{"name": n, "strategy": "online", "fraction": 0.01} for n in "abcd"]
  ref = {"name": "random_0.05", "strategy": "random", "fraction": 0.05}
  calls = []

  def run(jobs):
    calls.append([(sp["name"], seed) for sp, seed in jobs])
    out = []
    for sp, seed in jobs:
      f, g, t = vals.get(sp["name"], (0.5, 1.0, 0.5))
      out.append({"dev_mean_forgetting": f + 0.01 * seed, "dev_new_gain": g,
                  "mean_forgetting": t})
    return out

  res = suite_search.successive_halving(grid, 8, 3, run, ref)
  # Scores at rung 0: a 0.50, b 0.55, c 0.40 + 10 x (0.993 - 0.95) = 0.83, d 0.60 (gain
  # 0.995 is within 0.01 - 0.003 of 1.00): kept a, b. Rung 1: a 0.505, b 0.555: a.
  assert calls[0] == [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("random_0.05", 0)]
  assert res["rungs"][0]["kept"] == ["a", "b"]
  assert abs(res["rungs"][0]["dev_scores"]["c"] - 0.83) < 1e-9
  # The penalty starts 0.003 before the goal's 0.01 margin: a gain 0.008 below the
  # reference's is inside the goal but pays 10 x 0.001; 0.006 below pays nothing.
  assert abs(suite_search.dev_score(0.5, 0.992, 1.0) - 0.51) < 1e-9
  assert suite_search.dev_score(0.5, 0.994, 1.0) == 0.5
  assert calls[1] == [("a", 1), ("b", 1), ("random_0.05", 1)]
  assert res["chosen"]["name"] == "a" and res["runs"] == 8 and len(calls) == 2
  # A budget below rung 0 is refused before anything runs.
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="rung 0 needs 5"):
    suite_search.successive_halving(grid, 4, 3, run, ref)
  # Budget 6: rung 0 only (rung 1 would need 3 more); chosen = rung 0's best.
  calls.clear()
  assert suite_search.successive_halving(grid, 6, 3, run, ref)["chosen"]["name"] == "a"
  assert len(calls) == 1


def _assert_valid_overrides(grid):
  from cpt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.default_config()
  for g in grid:
    for key in g.get("overrides", {}):
      group, name = key.split(".")
      assert name in c[group], (g["name"], key)


def test_default_grid_names_are_unique_and_valid_overrides():
  s = suite.Settings(corpora="x")
  grid = suite_search.default_grid(s)
  assert len({g["name"] for g in grid}) == len(grid) == 13
  _assert_valid_overrides(grid)


@pytest.mark.parametrize("path", sorted([*(REPO / "benchmarks").glob("search_grid_*.json"),
                                         *(REPO / "benchmarks").glob("rows_*.json")]),
                         ids=lambda p: p.name)
def test_committed_search_grids_read_and_name_config_keys(path):
  """The grid and --add-rows files the suite's recorded runs used (README,
  docs/replay_selection.md): valid specs and config keys."""
  grid = suite_search.read_grid(str(path))
  _assert_valid_overrides(grid)
  from cpt_jax.replay import strategies  # pylint: disable=g-import-not-at-top
  for g in grid:
    assert g["strategy"] in strategies.REGISTRY, g["name"]


def _suite_cmd(tmp_path, out, *extra):
  """quick_suite's command line (same corpus, cache and M) with other row flags."""
  return [sys.executable, str(REPO / "benchmarks" / "cpt_suite.py"), "--quick",
          "--corpora", str(tmp_path / "corpus"), "--json", str(out),
          "--cache", str(tmp_path / "cache"), "--old", "alpha,beta,gamma,delta", "--new", "eps",
          "--unavailable", "gamma", "--pretrain-steps", "10", "--cpt-steps", str(CPT_STEPS),
          *extra]


def test_search_cli_with_a_grid_file_chooses_on_dev(quick_suite, tmp_path):
  """`--search N --search-grid G.json` (the README's search commands): rung 0 on seed 0,
  the choice written to <OUT>.chosen.json, the lowest dev score chosen."""
  import os  # pylint: disable=g-import-not-at-top
  suite_dir = quick_suite[2]
  grid = [{"name": "search_random_0.02", "strategy": "random", "fraction": 0.02},
          {"name": "search_steered_0.05", "strategy": "steered", "fraction": 0.05,
           "replay_kd": 1.0, "overrides": {"replay.steer_quota": 0.5}}]
  (tmp_path / "grid.json").write_text(json.dumps(grid))
  out = tmp_path / "search.json"
  cmd = _suite_cmd(suite_dir, out, "--seeds", "1", "--search", "3",
                   "--search-grid", str(tmp_path / "grid.json"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PATH="/usr/bin:/bin", XLA_FLAGS="")
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  data = json.loads(out.read_text())
  (rung,) = data["search"]["rungs"]
  assert set(rung["dev_scores"]) == {g["name"] for g in grid} and data["search"]["runs"] == 3
  chosen = json.loads((tmp_path / "search.chosen.json").read_text())
  assert chosen == min(grid, key=lambda g: rung["dev_scores"][g["name"]])
  assert "search: chose " + chosen["name"] in res.stdout
  # The reference row is quick_suite's random 5% run, reused from the cache.
  assert "1 reused" in res.stdout


def test_interpolate_reproduces_each_run_at_one_and_m_at_zero(quick_suite, tmp_path):
  """benchmarks/suite_interpolate.py on quick_suite's runs (a plain one and a sigma / tau
  one, whose tau must be merged): a = 1 is the suite's own row, a = 0 is M (no forgetting,
  no gain), a = 0.5 lies elsewhere; the dev choice never takes M itself (no forgetting, but
  no gain: the gain penalty must count); an unknown row name fails before any evaluation."""
  import os  # pylint: disable=g-import-not-at-top
  (runs,) = (quick_suite[2] / "cache").glob(f"cpt-*-{CPT_STEPS}")
  rows = ["random_0.05", "random_0.05+sigma_tau_routing"]
  out = tmp_path / "interp.json"
  cmd = [sys.executable, str(REPO / "benchmarks" / "suite_interpolate.py"), "--runs",
         str(runs), "--rows", ",".join(rows), "--alphas", "1,0.5,0", "--reference", "random_0.05", "--json", str(out)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PATH="/usr/bin:/bin", XLA_FLAGS="")
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  data = json.loads(out.read_text())["rows"]
  suite_rows = {r["name"]: r for r in quick_suite[0]["rows"]}
  for name in rows:
    got, want = data[name]["alphas"], suite_rows[name]
    assert data[name]["check"] < 1e-5, (name, data[name]["check"])
    assert abs(got["1.0"]["mean_forgetting"] - want["mean_forgetting"]) < 1e-5
    assert abs(got["1.0"]["new_gain"] - want["new_gain"]) < 1e-5
    assert abs(got["0.0"]["mean_forgetting"]) < 1e-6 and abs(got["0.0"]["new_gain"]) < 1e-6
    half = got["0.5"]
    assert abs(half["new_gain"] - want["new_gain"]) > 1e-3 and abs(half["new_gain"]) > 1e-3
    assert data[name]["chosen_alpha"] in (1.0, 0.5)
  assert f"| {rows[0]} | 0.5 |" in res.stdout
  bad = subprocess.run(cmd[:5] + ["random_0.05,nope"] + cmd[6:], capture_output=True,
                       text=True, timeout=300, env=env)
  assert bad.returncode != 0 and bad.stderr.startswith("--rows nope: no finished run")


def test_search_cli_rejects_a_bad_grid_file_before_training(tmp_path):
  (tmp_path / "grid.json").write_text(json.dumps([{"name": "a", "strategy": "random"}]))
  cmd = [sys.executable, str(REPO / "benchmarks" / "cpt_suite.py"), "--quick", "--corpora",
         str(tmp_path), "--json", str(tmp_path / "o.json"), "--search", "3",
         "--search-grid", str(tmp_path / "grid.json")]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode != 0
  assert "grid.json: entry 0 lacks ['fraction']" in res.stderr
  assert not (tmp_path / "o.json").exists()


# ------------------------------------------------------------------ Pareto view
def _pt(name, frac, forget, gain, tf, tok):
  return {"name": name, "replay_fraction": frac, "mean_forgetting": forget, "new_gain": gain,
          "total_tflops": tf, "replay_tokens": tok}


def test_pareto_frontier_and_beats_random_on_hand_made_points():
  table = [_pt("random_0.005", 0.005, 0.95, 1.69, 10.05, 50),
           _pt("random_0.01", 0.01, 0.90, 1.70, 10.1, 100),
           _pt("random_0.05", 0.05, 0.50, 1.69, 10.5, 500),
           _pt("random_0.25", 0.25, 0.30, 1.60, 12.5, 2500),
           # 1%: forgets less than random 5% and gains within 0.01, cheaper: beats 5%.
           _pt("x_0.01", 0.01, 0.48, 1.682, 10.4, 100),
           # Same point but more FLOPs than random 5% (10.6 > 10.5): beats nothing.
           _pt("y_0.01", 0.01, 0.48, 1.682, 10.6, 100),
           # Gain 0.011 below random 5%'s: outside the margin.
           _pt("z_0.01", 0.01, 0.45, 1.679, 10.4, 100),
           _pt("no_replay", 0.0, 1.0, 1.70, 10.0, 0)]
  out = suite_pareto.pareto(table)
  assert [p["name"] for p in out["random_curve"]] == ["random_0.005", "random_0.01",
                                                       "random_0.05", "random_0.25"]
  # 0.005 is dominated by 0.01 (forgets more, gains less); the others trade off.
  assert out["random_frontier"] == ["random_0.01", "random_0.05", "random_0.25"]
  rows = out["rows"]
  assert rows["x_0.01"]["beats_random_at"] == [0.05]
  assert rows["y_0.01"]["beats_random_at"] == []
  assert rows["z_0.01"]["beats_random_at"] == []
  # random 1% beats random 0.5% (fewer tokens? no: 100 > 50): nothing.
  assert rows["random_0.01"]["beats_random_at"] == []
  # 0.7 lies halfway between 0.90 (1%) and 0.50 (5%): sqrt(0.01 x 0.05) = 0.02236.
  assert abs(suite_pareto.equivalent_fraction(0.7, out["random_curve"]) - 0.0223607) < 1e-6
  # 0.45 lies a quarter of the way from 0.50 (5%) to 0.30 (25%): 0.05 x 5^(1/4) = 0.074767.
  assert abs(rows["z_0.01"]["random_equivalent_fraction"] - 0.0747674) < 1e-6
  assert rows["no_replay"]["random_equivalent_fraction"] is None  # forgets more than 0.5%
  # Overall frontier (forgetting, gain): x and y are the same point (neither dominates);
  # z forgets less but gains less; random 0.5% is dominated.
  assert out["frontier"] == ["random_0.01", "random_0.05", "random_0.25", "x_0.01", "y_0.01",
                             "z_0.01"]


@pytest.mark.parametrize("preset,rows,workers,full_shape", [
    ("gpu", ["no_replay", "random_0.01", "random_0.05", "online_0.01", "online_0.01+kd"], 1,
     (512, 8, 512, 2)),
    ("mid", ["random_0.01", "random_0.05", "online_0.01+kd"], None, (256, 4, 128, 1))])
def test_preset_quick_runs_its_rows_on_cpu(tmp_path, preset, rows, workers, full_shape):
  """--preset P --quick: the preset's rows, with the quick model (gpu: one run at a time)."""
  import os  # pylint: disable=g-import-not-at-top
  corpus = write_corpus(tmp_path / "corpus", domains=("alpha", "beta", "gamma"), docs=60)
  out = tmp_path / f"{preset}.json"
  cmd = [sys.executable, str(REPO / "benchmarks" / "cpt_suite.py"), "--preset", preset,
         "--quick", "--corpora", str(corpus), "--json", str(out),
         "--cache", str(tmp_path / "cache"), "--old", "alpha,beta", "--new", "gamma",
         "--unavailable", "beta", "--pretrain-steps", "6", "--cpt-steps", "12"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  data = json.loads(out.read_text())
  assert [r["name"] for r in data["table"]] == rows
  assert data["settings"]["d_model"] == 64
  if workers:
    assert data["settings"]["workers"] == workers
  full = suite.PRESETS[preset](suite.Settings(corpora="x"))
  assert (full.d_model, full.num_layers, full.seq_len, full.seeds) == full_shape


def test_mid_preset_scales_the_model_and_keeps_the_default_stage():
  """--preset mid: 7x the default model at the default stage length, the rows that compare."""
  base = suite.Settings(corpora="x")
  s = suite.mid_preset(base)
  assert (s.d_model, s.num_layers, s.seeds) == (256, 4, 1)
  # The stage is the default one (same T tokens, same M steps), so only capacity changes.
  assert (s.seq_len, s.batch, s.pretrain_steps, s.cpt_steps) == (
      base.seq_len, base.batch, base.pretrain_steps, base.cpt_steps)
  assert s.pretrain_key() != base.pretrain_key()  # its own M
  names = [sp["name"] for sp in suite.select_specs(suite.run_specs(s), s.only)]
  assert names == ["random_0.01", "random_0.05", "online_0.01+kd"]


def test_a_row_counts_every_part_of_the_stage_in_its_total_tflops():
  """Train steps, teacher forwards, second pull-backs, the EWC Fisher pass and selection:
  each a distinct power of two, so a part left out or counted twice shows."""
  s = suite.Settings(corpora="unused", old=("a",), new="t", dev_share=0.0)
  summary = {"eval": {"a": {"loss": 1.0}, "t": {"loss": 2.0}}, "train_tflops": 1.0,
             "teacher_tflops": 2.0, "pullback_tflops": 4.0, "fisher_tflops": 8.0,
             "selection": {"tflops": 16.0}, "data": {"tokens_per_role": {"new": 10}},
             "steps_run": 1, "seconds": 1.0}
  row = suite.result_row(s, {"name": "r", "strategy": "online", "fraction": 0.01}, 0,
                         summary, {"a": 0.5, "t": 3.0})
  assert row["total_tflops"] == 31.0 and row["selection_share"] == 16.0 / 31.0
  assert row["mean_forgetting"] == 0.5 and row["new_gain"] == 1.0
