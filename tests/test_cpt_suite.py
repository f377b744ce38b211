"""benchmarks/cpt_suite.py --quick runs end to end (on a synthetic corpus, tiny steps)."""

import json
import subprocess
import sys

from tests.conftest import REPO
import suite_lib as suite  # benchmarks/ is on sys.path (conftest)
from tests.helpers import write_corpus


def test_cpt_suite_quick_is_fair(tmp_path):
  """Every row trains on the same T tokens; no_replay replays nothing; selection within its cap.

  forgetting is left out: at this scale its fixed look-ahead (4 train steps) plus one scored
  pass over the buffer's candidates exceed 5% of an 84-step stage (the planner warns).
  """
  import math  # pylint: disable=g-import-not-at-top
  corpus = write_corpus(tmp_path / "corpus", domains=("alpha", "beta", "gamma", "delta", "eps"),
                        docs=80)
  out = tmp_path / "out.json"
  cpt_steps, batch, seq_len = 80, 16, 64  # --cpt-steps; suite.quick's batch and seq_len
  cmd = [sys.executable, str(REPO / "benchmarks" / "cpt_suite.py"), "--quick",
         "--corpora", str(corpus), "--json", str(out), "--cache", str(tmp_path / "cache"),
         "--old", "alpha,beta,gamma,delta", "--new", "eps", "--unavailable", "gamma",
         "--pretrain-steps", "10", "--cpt-steps", str(cpt_steps),
         "--strategies", "teacher_loss,online"]
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "XLA_FLAGS": ""}
  import os  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, **env)
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  data = json.loads(out.read_text())
  names = [r["name"] for r in data["rows"]]
  assert names == ["no_replay", "random_0.05", "teacher_loss_0.05", "online_0.05",
                   "random_0.05+distill", "joint", "random_0.05+kd"]
  rows = {r["name"]: r for r in data["rows"]}
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
    if r["strategy"] in ("random", "no_replay", "joint"):
      assert r["selection_tflops"] == 0, n
    assert r["selection_fraction"] == 0.05
    # The planner fills the cap with whole candidates, so it may be met exactly (1e-9: float).
    assert r["selection_tflops"] <= 0.05 * r["total_tflops"] * (1 + 1e-9), n
  assert rows["random_0.05+kd"]["teacher_tflops"] > 0 == rows["random_0.05"]["teacher_tflops"]
  assert "| teacher_loss_0.05 |" in res.stdout


def test_cpt_suite_kd_controller_and_decomposition_rows(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  corpus = write_corpus(tmp_path / "corpus", domains=("alpha", "beta", "gamma"), docs=60)
  out = tmp_path / "out.json"
  cmd = [sys.executable, str(REPO / "benchmarks" / "cpt_suite.py"), "--quick",
         "--corpora", str(corpus), "--json", str(out), "--cache", str(tmp_path / "cache"),
         "--old", "alpha,beta", "--new", "gamma", "--unavailable", "beta",
         "--pretrain-steps", "6", "--cpt-steps", "4", "--extras", "kd,controllers,decomposition",
         "--kd-strategies", "random,online",
         "--only", "online_0.05+kd,random_0.05+forgetting,random_0.05+full,random_0.05+lora_tau,"
                   "random_0.05+sigma_tau_routing", "--workers", "1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"online_0.05+kd", "random_0.05+forgetting", "random_0.05+full",
                       "random_0.05+lora_tau", "random_0.05+sigma_tau_routing"}
  assert rows["online_0.05+kd"]["teacher_tflops"] > 0  # online rows distilled from M too
  full, lora = rows["random_0.05+full"], rows["random_0.05+lora_tau"]
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
                     extras=())
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
