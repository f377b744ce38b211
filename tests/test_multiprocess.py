"""Two processes x four CPU devices through jax.distributed, against one process x eight.

A staged run (pretrain -> cpt with a teacher on distill rows, online replay and a
DoReMi controller) on localhost: the first launch is preempted by SIGTERM sent to
process 1 alone (both processes save at the same step and exit 0), the restart through
the command line (COORDINATOR / NUM_PROCESSES / PROCESS_ID, as the README documents)
resumes and finishes. Its per-step losses and report equal the one-process run's within
1e-5; only process 0 writes the shared files; its checkpoint resumes on one process x
eight devices with another mesh shape (elastic resume).
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

from cpt_jax import run as run_lib
from cpt_jax.train import metrics as metrics_lib
from tests import helpers
from tests import multiprocess_worker as worker

TOL = 1e-5
SIGTERM_AT = 2  # the cpt step after which process 1 gets SIGTERM
CLI_CONFIG = """
import sys
sys.path.insert(0, {repo!r})
from tests import multiprocess_worker
def get_config():
  return multiprocess_worker.staged_config({corpus!r}, {cache!r})
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(port: int, i: int, cache: pathlib.Path) -> dict:
  """A launcher's variables for process i; the launches share compiled programs (cache)."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
          "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
          "PYTHONPATH": str(helpers.REPO), "COORDINATOR": f"localhost:{port}",
          "NUM_PROCESSES": "2", "PROCESS_ID": str(i)}


def _launch(argvs: list[list[str]], logs: pathlib.Path) -> list[tuple[int, str]]:
  """Runs one command per process at once; [(status, output)] in process order."""
  port, procs = _free_port(), []
  for i, argv in enumerate(argvs):
    out = open(logs / f"p{i}.log", "w", encoding="utf-8")  # pylint: disable=consider-using-with
    env = _env(port, i, logs.parent / "jax_cache")
    procs.append((subprocess.Popen(argv, cwd=helpers.REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT), out))
  try:
    status = [p.wait(timeout=600) for p, _ in procs]
  finally:
    for p, out in procs:
      if p.poll() is None:  # one hung or failed: end the others too
        p.kill()
      out.close()
  return [(rc, (logs / f"p{i}.log").read_text(encoding="utf-8")) for i, rc in enumerate(status)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  corpus = helpers.write_corpus(root / "corpus", domains=worker.DOMAINS, docs=60)
  cache = root / "cache"  # built by the reference run, read by the others
  one = root / "one"
  one_report = run_lib.run(worker.staged_config(corpus, cache), str(one))
  two = root / "two"
  first = root / "first"
  first.mkdir()
  spec = first / "spec.json"
  spec.write_text(json.dumps({"corpus": str(corpus), "cache": str(cache), "mesh": [-1, 1, 1],
                              "workdir": str(two), "sigterm": None}))
  spec1 = first / "spec1.json"
  spec1.write_text(json.dumps({**json.loads(spec.read_text()), "sigterm": SIGTERM_AT}))
  script = str(helpers.REPO / "tests" / "multiprocess_worker.py")
  preempted = _launch([[sys.executable, script, str(spec)],
                       [sys.executable, script, str(spec1)]], first)
  after_first = {"cpt_summary": (two / "stages" / "cpt" / "summary.json").exists(),
                 "checkpoints": sorted(int(s) for s in os.listdir(
                     two / "stages" / "cpt" / "checkpoints") if s.isdigit())}
  again = root / "again"
  again.mkdir()
  config_file = again / "config.py"
  config_file.write_text(CLI_CONFIG.format(repo=str(helpers.REPO), corpus=str(corpus),
                                           cache=str(cache)))
  argv = [sys.executable, "-m", "cpt_jax.main", f"--config={config_file}", f"--workdir={two}"]
  restarted = _launch([argv, argv], again)
  return {"root": root, "corpus": corpus, "cache": cache, "one": one, "two": two,
          "one_report": one_report, "preempted": preempted, "after_first": after_first,
          "restarted": restarted}


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(workdir))}


def _close(a, b, path=""):
  """Every number of `a` within TOL of `b`'s (timings skipped); the same structure."""
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), path
    for k in a:
      if k not in ("seconds",):
        _close(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _close(x, y, f"{path}[{i}]")
  elif isinstance(a, float):
    assert b == pytest.approx(a, abs=TOL), path
  else:
    assert a == b, path


def _preempted_step(output: str) -> int:
  line = next(l for l in output.splitlines() if "preempted: saved the checkpoint of step" in l)
  return int(line.split("of step ")[1].split()[0])


def test_sigterm_to_one_process_stops_both_at_one_step_with_status_0(runs):
  (rc0, out0), (rc1, out1) = runs["preempted"]
  assert rc0 == 0 and rc1 == 0, out0[-3000:] + out1[-3000:]
  step = _preempted_step(out0)
  assert _preempted_step(out1) == step and SIGTERM_AT < step < 10
  assert not runs["after_first"]["cpt_summary"]  # the stage is not finished
  assert step in runs["after_first"]["checkpoints"]
  for rc, out in runs["restarted"]:
    assert rc == 0, out[-3000:]
  cpt = json.loads((runs["two"] / "stages" / "cpt" / "summary.json").read_text())
  assert cpt["init"] == f"resumed from step {step}" and cpt["step"] == 10


def test_two_processes_equal_one_process_per_step_and_in_the_report(runs):
  for stage in ("pretrain", "cpt"):
    one, two = _losses(runs["one"] / "stages" / stage), _losses(runs["two"] / "stages" / stage)
    assert sorted(one) == sorted(two) == list(range(1, 5 if stage == "pretrain" else 11))
    for s, loss in one.items():
      assert two[s] == pytest.approx(loss, abs=TOL), (stage, s)
  report = json.loads((runs["two"] / "report.json").read_text())
  _close(json.loads((runs["one"] / "report.json").read_text()), report)
  assert report["stages"][1]["tokens"]["selection"] > 0  # online replay scored rows


def test_only_process_0_writes_the_shared_files(runs):
  """One record per step in each metric file (no second writer, no interleaved lines), one
  selection file, one report; process 1 printed no status line."""
  for stage in ("pretrain", "cpt"):
    for name in ("metrics.jsonl", "eval.jsonl"):
      lines = (runs["two"] / "stages" / stage / name).read_text().splitlines()
      records = [json.loads(l) for l in lines]  # each line whole JSON
      steps = [r["step"] for r in records]
      assert steps == sorted(set(steps)), (stage, name, steps)
  sel = (runs["two"] / "stages" / "cpt" / "replay_selection" / "selection.jsonl").read_text()
  one_sel = (runs["one"] / "stages" / "cpt" / "replay_selection" / "selection.jsonl").read_text()
  assert sel.count("\n") == one_sel.count("\n")
  assert "report:" in runs["restarted"][0][1] and "report:" not in runs["restarted"][1][1]


def _resume_from(runs, back_to: int, mesh) -> None:
  """Drops the cpt stage's checkpoints after `back_to` (and its summary), then runs the
  config on this process's 8 devices with `mesh`: it resumes from `back_to`."""
  cpt = runs["two"] / "stages" / "cpt"
  for s in os.listdir(cpt / "checkpoints"):
    if s.isdigit() and int(s) > back_to:
      shutil.rmtree(cpt / "checkpoints" / s)
  os.remove(cpt / "summary.json")
  run_lib.run(worker.staged_config(runs["corpus"], runs["cache"], mesh), str(runs["two"]))
  summary = json.loads((cpt / "summary.json").read_text())
  assert summary["init"] == f"resumed from step {back_to}" and summary["num_devices"] == 8
  one, again = _losses(runs["one"] / "stages" / "cpt"), _losses(cpt)
  for s in range(back_to + 1, 11):
    assert again[s] == pytest.approx(one[s], abs=TOL), (mesh, back_to, s)


def test_elastic_resume_on_one_process_and_another_mesh(runs):
  """The step-4 checkpoint the 2 x 4 run wrote on mesh (8, 1, 1) resumes on 1 x 8 devices
  with mesh (2, 2, 2): the next steps' losses are the uninterrupted run's. Last in this
  module: it rewrites the two-process run's cpt stage."""
  _resume_from(runs, 4, (2, 2, 2))
