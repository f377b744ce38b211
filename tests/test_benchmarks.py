"""benchmarks/memory.py and benchmarks/throughput.py run end to end at a tiny shape (--quick)
and print the JSON their README figures come from."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from helpers import REPO, write_corpus

from cpt_jax.schema import mixing as mixing_schema
import profile_summary  # benchmarks/ is on sys.path (conftest)
import throughput


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


def test_throughput_quick_prices_every_feature(tmp_path):
  out = _run("throughput.py", "--quick", "--no_baseline", "--profile", str(tmp_path / "trace"),
             "--features", "replay_25,distill_5,distill_25,sigma_tau_routing")
  assert out["tokens_per_sec"] > 0 and 0 < out["mfu"]
  assert out["spec_tflops"] is None and out["mfu_spec"] is None  # f32 on a CPU: no datasheet
  # The profiled step: its matmuls are found (through the compiled module beside the trace).
  prof = out["profile"]
  assert (tmp_path / "trace" / "train_step.hlo.txt").exists()
  assert prof["kinds"]["matmul"]["seconds"] > 0 and prof["top_ops"]
  assert abs(sum(k["share"] for k in prof["kinds"].values()) - 1) < 1e-6
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


def test_spec_rate_is_the_named_chips_bf16_datasheet_figure():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  assert throughput.spec_tflops("NVIDIA H200", jnp.bfloat16) == 989.0
  assert throughput.spec_tflops("NVIDIA H100 80GB HBM3", jnp.bfloat16) == 989.0
  assert throughput.spec_tflops("NVIDIA H100 PCIe", jnp.bfloat16) == 756.0  # not the SXM part's
  assert throughput.spec_tflops("TPU v5 lite", jnp.bfloat16) == 197.0  # v5e, not v5p
  assert throughput.spec_tflops("TPU v5", jnp.bfloat16) == 459.0
  assert throughput.spec_tflops("NVIDIA H200", jnp.float32) is None
  assert throughput.spec_tflops("cpu", jnp.bfloat16) is None


def test_profile_summary_tells_matmuls_from_elementwise_work(tmp_path):
  """Two programs traced on this CPU: the one that multiplies matrices spends its time in
  matmuls, the elementwise one in other fusions (XLA's CPU backend names both fusions
  alike; the compiled module beside the trace tells them apart)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.ones((512, 512))
  programs = {"matmul": (jax.jit(lambda a: (a @ a) @ a), x),
              "fusion": (jax.jit(lambda a: jnp.tanh(jnp.exp(a) * 3 + 1).sum()), x)}
  for expected, (fn, arg) in programs.items():
    compiled = fn.lower(arg).compile()
    trace = tmp_path / expected
    trace.mkdir()
    (trace / "step.hlo.txt").write_text(compiled.as_text())
    compiled(arg).block_until_ready()
    with jax.profiler.trace(str(trace)):
      for _ in range(3):
        compiled(arg).block_until_ready()
    out = profile_summary.summarize(str(trace))
    top_kind = max(out["kinds"], key=lambda k: out["kinds"][k]["seconds"])
    assert top_kind == expected, out["kinds"]
    assert out["device_ops_seconds"] > 0 and out["busy_fraction"] > 0
  # The command line prints the same summary.
  cli = _run("profile_summary.py", str(tmp_path / "matmul"), "--top", "3")
  assert len(cli["top_ops"]) <= 3 and cli["top_ops"][0]["kind"] == "matmul"


def test_gpu_session_script_runs_each_part_at_a_tiny_shape(tmp_path):
  """benchmarks/gpu_session.sh (the one call a lent GPU gets) end to end on this CPU at
  the quick sizes: both throughput parts, the suite rows and their merges toward M, the
  files it hands back."""
  corpus = write_corpus(tmp_path / "corpus", domains=("alpha", "beta", "gamma"), docs=60)
  out, state = tmp_path / "out", tmp_path / "state"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", OUT=str(out), STATE=str(state),
             BUDGET="900", CORPORA=str(corpus), SHAPE="--quick", FEATURES="replay_25",
             SUITE_EXTRA="--quick --pretrain-steps 6 --cpt-steps 12 --old alpha,beta "
                         "--new gamma --unavailable beta",
             SPLIT2="--old gamma,beta --new alpha --unavailable beta", SUITE_SEEDS="1")
  res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh")], env=env,
                       capture_output=True, text=True, timeout=900, check=False)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  tp = json.loads((out / "throughput_1b.json").read_text())
  assert tp["remat"] == "dots_no_batch" and "profile" not in tp
  assert json.loads((out / "attention_1b.json").read_text())["remat"] == "dots_no_batch_attention"
  assert json.loads((out / "profile_1b.json").read_text())["profile"]["top_ops"]
  distill = json.loads((out / "distill_1b.json").read_text())
  assert distill["remat"] == "full" and distill["features"]["distill_25"]["ratio"] > 0
  features = json.loads((out / "features_gpt2.json").read_text())["features"]
  assert features["replay_25"]["ratio"] > 0 and "distill_25" not in features
  # The dev search (the grid's 5 rows and random 5% on seed 0), then its choice and random
  # 5% on the second split, then no replay and random 1% on the default split.
  grid = [r["name"] for r in json.loads(
      (REPO / "benchmarks" / "search_grid_gpu_features.json").read_text())]
  chosen = json.loads((out / "search.chosen.json").read_text())["name"]
  assert chosen in grid
  rows = json.loads((out / "suite_rows.json").read_text())["rows"]
  assert sorted(r["name"] for r in rows) == sorted(
      [*grid, "random_0.05", chosen, "random_0.05", "no_replay", "random_0.01"])
  split2 = json.loads((out / "split2.json").read_text())
  assert split2["settings"]["new"] == "alpha" and len(split2["rows"]) == 2
  # 3b: every finished default-split run merged toward M, each reproduced at a = 1.
  merged = json.loads((out / "interpolate.json").read_text())["rows"]
  assert sorted(merged) == sorted([*grid, "random_0.05", "no_replay", "random_0.01"])
  assert all(r["check"] < 1e-5 and r["chosen_alpha"] in (1.0, 0.97, 0.95, 0.9)
             for r in merged.values())
  assert (out / "trace.tgz").exists() and (out / "log.txt").exists()
  # A second call on the same machine skips what is done and reuses the suite's rows.
  res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh")], env=env,
                       capture_output=True, text=True, timeout=900, check=False)
  assert res.returncode == 0 and "== 1." not in res.stdout
  assert "6 reused" in res.stdout and res.stdout.count("2 reused") == 2


def test_hlo_kinds_reads_gpu_custom_calls_and_fusions():
  """A compiled module's text as a GPU backend writes it: cuBLAS and cuDNN custom calls,
  a fusion around a dot, a copy-only fusion, an elementwise fusion, a tuple-typed op."""
  hlo = """
%fused_dot (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.2 = bf16[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_copy (p0.1: bf16[8,8]) -> bf16[8,8] {
  %p0.1 = bf16[8,8]{1,0} parameter(0)
  %bitcast.1 = bf16[8,8]{0,1} bitcast(%p0.1)
  ROOT %transpose.3 = bf16[8,8]{1,0} transpose(%bitcast.1), dimensions={1,0}
}

%fused_add (p0.2: bf16[8,8]) -> bf16[8,8] {
  %p0.2 = bf16[8,8]{1,0} parameter(0)
  ROOT %add.1 = bf16[8,8]{1,0} add(%p0.2, %p0.2)
}

ENTRY %main (a: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %custom-call.1 = (bf16[8,8]{1,0}, s8[4096]{0}) custom-call(%a, %a), custom_call_target="__cublas$lt$matmul"
  %custom-call.2 = (bf16[8,8]{1,0}, u8[0]{0}) custom-call(%a, %a, %a), custom_call_target="__cudnn$fmhaSoftmax"
  %gemm_fusion.4 = bf16[8,8]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot
  %loop_transpose_fusion = bf16[8,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_copy
  %loop_add_fusion = bf16[8,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_add
  ROOT %all-reduce.7 = bf16[8,8]{1,0} all-reduce(%a), replica_groups={}, to_apply=%fused_add
}
"""
  kinds = profile_summary.hlo_kinds(hlo)
  assert kinds["custom-call.1"] == "matmul"
  assert kinds["custom-call.2"] == "attention"
  assert kinds["gemm_fusion.4"] == "matmul"
  assert kinds["loop_transpose_fusion"] == "copy_transpose"
  assert kinds["loop_add_fusion"] == "fusion"
  assert kinds["all-reduce.7"] == "collective"
