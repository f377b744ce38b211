"""benchmarks/cpt_suite.py --quick runs end to end (on a synthetic corpus, tiny steps)."""

import json
import subprocess
import sys

from tests.conftest import REPO
from tests.helpers import write_corpus


def test_cpt_suite_quick(tmp_path):
  corpus = write_corpus(tmp_path / "corpus", domains=("alpha", "beta", "gamma", "delta", "eps"),
                        docs=80)
  out = tmp_path / "out.json"
  cmd = [sys.executable, str(REPO / "benchmarks" / "cpt_suite.py"), "--quick",
         "--corpora", str(corpus), "--json", str(out), "--cache", str(tmp_path / "cache"),
         "--old", "alpha,beta,gamma,delta", "--new", "eps", "--unavailable", "gamma",
         "--pretrain-steps", "10", "--cpt-steps", "6", "--strategies", "forgetting,online"]
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "XLA_FLAGS": ""}
  import os  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, **env)
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  data = json.loads(out.read_text())
  names = [r["name"] for r in data["rows"]]
  assert names == ["no_replay", "random_0.05", "forgetting_0.05", "online_0.05",
                   "random_0.05+distill", "joint", "random_0.05+kd"]
  for r in data["rows"]:
    for k in ("name", "replay_fraction", "old_loss", "mean_forgetting", "new_gain",
              "selection_tflops", "total_tflops", "seconds"):
      assert k in r, k
    assert set(r["old_loss"]) == {"alpha", "beta", "gamma", "delta"}
  rows = {r["name"]: r for r in data["rows"]}
  assert rows["forgetting_0.05"]["selection_tflops"] > 0
  assert rows["no_replay"]["selection_tflops"] == 0
  assert rows["random_0.05+kd"]["teacher_tflops"] > 0 == rows["random_0.05"]["teacher_tflops"]
  assert "| forgetting_0.05 |" in res.stdout


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
  from cpt_jax.replay import suite  # pylint: disable=g-import-not-at-top
  names = lambda s: [r["name"] for r in suite.run_specs(s) if "+kd" in r["name"]]
  assert names(suite.Settings(corpora="x")) == ["random_0.01+kd"]
  s = suite.Settings(corpora="x", kd_strategies=("random", "online"), kd_weight=2.0)
  assert names(s) == ["random_0.01+kd2", "online_0.01+kd2"]  # never mixed with weight 4's cache
  assert {r["replay_kd"] for r in suite.run_specs(s) if "+kd" in r["name"]} == {2.0}
