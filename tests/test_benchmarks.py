"""benchmarks/memory.py and benchmarks/throughput.py run end to end at a tiny shape (--quick)
and print the JSON their README figures come from."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from helpers import REPO

from cpt_jax.schema import mixing as mixing_schema


def _run(script: str, *args: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO))
  res = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                       capture_output=True, text=True, timeout=900, env=env, check=False)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return json.loads(res.stdout)


def test_memory_quick_fsdp_shards_state_and_teacher():
  out = _run("memory.py", "--quick", "--remat", "full")
  assert out["shape"]["num_layers"] == 2 and out["loadavg"]
  runs = {(r["devices"], r["kd"]): r for r in out["runs"]}
  assert set(runs) == {(1, False), (1, True), (8, False), (8, True)}
  # Parameters and AdamW moments are sharded over the 8-device FSDP axis (norm scales are
  # replicated, hence a little above 1/8).
  assert 0.125 <= out["fsdp8_state_bytes_per_device_ratio"] <= 0.1375
  kd = out["kd_teacher"]
  assert kd["extra_opt_state_bytes_fsdp8"] == 0  # the teacher has no optimizer state
  assert kd["teacher_bytes_per_device_1"] == runs[(1, False)]["param_bytes"]
  assert 1.0 <= kd["teacher_over_param_bytes_per_fsdp8"] <= 1.1
  for r in out["runs"]:
    assert r["temp_bytes"] > 0 and r["peak_bytes"] >= r["argument_bytes"]


def test_throughput_quick_prices_every_feature():
  out = _run("throughput.py", "--quick", "--no_baseline",
             "--features", "replay_25,distill_5,distill_25,sigma_tau_routing")
  assert out["tokens_per_sec"] > 0 and 0 < out["mfu"]
  if importlib.util.find_spec("nanodo") is None:
    assert "not installed" in out["nanodo"]["skipped"]
  else:  # nanodo's two-matrix MLP does less work a token than our SwiGLU
    nd = out["nanodo"]
    assert 0 < nd["model_tflops_per_step"] < out["model_tflops_per_step"]
    assert nd["tokens_per_sec"] > 0 and 0 < nd["mfu"] and nd["mfu_ratio"] > 0
  f = out["features"]
  assert f["plain"]["ratio"] == 1.0
  assert "replay_5" not in f and "lora_no_routing" not in f  # --features picks the rows
  rows = {k: f[k]["rows"] for k in ("replay_25", "distill_5", "distill_25")}
  assert rows == {"replay_25": {"new": 12, "replay": 4}, "distill_5": {"new": 15, "distill": 1},
                  "distill_25": {"new": 12, "distill": 4}}
  assert f["distill_25"]["goal"] == 1 + 0.25 / 3 + 0.05
  # Replay rows are CE rows like new ones: the same compiled FLOPs; a teacher and a second
  # pull-back (sigma / tau routing) cost more.
  assert f["replay_25"]["hlo_flops_ratio"] == 1.0
  assert f["distill_25"]["hlo_flops_ratio"] > 1.0 and f["sigma_tau_routing"]["hlo_flops_ratio"] > 1.0
  for k in ("sigma_tau_routing", "replay_25", "distill_25"):
    assert f[k]["seconds_per_step"] > 0 and f[k]["ratio"] > 0
  topk = f["kd_topk"]["vocab_1024"]
  assert set(topk) >= {"plain", "kd_full", "kd_top64"}
  # Top-k KD keeps k of the teacher's V probabilities per token, not all of them.
  assert topk["temp_bytes_saved_vs_full_kd"] > 0
  assert set(f["controllers_200_domains"]) == set(mixing_schema.CONTROLLERS)
  assert len(f["timing"]["loadavg_before"]) == 3
