"""launch/tpu_pod.sh, launch/gpu_multinode.sh and launch/slurm.sbatch against stand-in
`gcloud`, `srun` and `sbatch` (tests/standins/): a slice of local "workers" with their own
homes, /tmp and /dev, and SLURM tasks as local processes. The job is a stand-in entry that
records its argv, working folder, code version and environment (tests/standins/entry.py),
so nothing trains here."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STANDINS = REPO / "tests" / "standins"

# Overrides a shell would mangle: parentheses, quotes, ';', '$', '*', spaces, a newline.
TRICKY = [
    "--config.sharding.mesh_shape=(1,-1,1)",
    "--config.mixing.schedule='0:a=0.5;100:a=0.2'",
    '--config.data.new="alpha beta"',
    "--config.note=cost $HOME * 2; echo pwned > /tmp/pwned `id` && exit 7",
    "--config.multi=line one\nline two",
    "--config.empty=",
]


def _bash_ok():
  return shutil.which("bash") and shutil.which("setsid") and shutil.which("tar")


pytestmark = pytest.mark.skipif(not _bash_ok(), reason="needs bash, setsid and GNU tar")


def _records(folder, rank):
  path = pathlib.Path(folder) / f"standin-{rank}.jsonl"
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _wait_for(predicate, timeout=20.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


# ----------------------------------------------------------------- TPU VM slice


@pytest.fixture
def slice_(tmp_path):
  """A checkout to launch, a two-worker stand-in slice, and a `launch(*overrides)`."""
  repo = tmp_path / "checkout"
  (repo / "launch").mkdir(parents=True)
  shutil.copy(REPO / "launch" / "tpu_pod.sh", repo / "launch")
  pkg = repo / "fakepkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text('VERSION = "v1"\n')
  shutil.copy(STANDINS / "entry.py", pkg / "main.py")
  (pkg / "workdir.py").write_text("# a module named like a run folder: it ships\n")
  # What must not ship: version control, run folders, caches, build outputs.
  for junk in (".git/objects/pack", "workdir/checkpoints", "workdir_demo", "runs/x",
               "build/lib", "fakepkg.egg-info", "fakepkg/__pycache__", ".pytest_cache",
               ".import_linter_cache"):
    (repo / junk).mkdir(parents=True)
    (repo / junk / "junk.bin").write_bytes(b"x" * 10)
  (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")

  world = tmp_path / "slice"
  for i in range(2):
    for sub in ("home", "tmp", "dev"):
      (world / f"worker{i}" / sub).mkdir(parents=True)
    (world / f"worker{i}" / "dev" / "accel0").write_text("")
    (world / f"worker{i}" / "tmp" / "libtpu_lockfile").write_text("stale")
  env = dict(os.environ, PATH=f"{STANDINS}:{os.environ['PATH']}", FAKE_TPU_ROOT=str(world),
             FAKE_TPU_WORKERS="2", CPT_ENTRY="python3 -m fakepkg.main",
             CPT_PIP=str(STANDINS / "pip"), CPT_KILL_GRACE="5")

  def launch(*overrides, extra_env=None, timeout=60):
    return subprocess.run(
        ["bash", str(repo / "launch" / "tpu_pod.sh"), "my-tpu", "us-east5-a", "configs/demo.py",
         "gs://bucket/run", *overrides],
        env=dict(env, **(extra_env or {})), capture_output=True, text=True, timeout=timeout)

  def home(i):
    return world / f"worker{i}" / "home"

  yield repo, world, home, launch, env
  # Stop whatever the launches left running (detached runs, stale stand-ins).
  for pidfile in world.glob("worker*/home/cpt_runs/*/pid"):
    try:
      os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def test_tpu_overrides_arrive_intact_on_every_worker(slice_):
  _, _, home, launch, _ = slice_
  r = launch(*TRICKY)
  assert r.returncode == 0, r.stdout + r.stderr
  for i in range(2):
    (start, end) = _records(home(i), i)
    assert start["argv"] == ["--config=configs/demo.py", "--workdir=gs://bucket/run",
                             "--config.distributed.initialize=yes", *TRICKY]
    assert end["phase"] == "end"
    run = pathlib.Path(start["cwd"]).parent
    assert run.parent == home(i) / "cpt_runs" and start["cwd"] == str(run / "code")
    assert (run / "exit_status").read_text().strip() == "0"
    # jax[tpu] the current way, then the shipped checkout.
    assert (home(i) / "pip.log").read_text().splitlines() == [
        "install -q -U jax[tpu]", f"install -q -e {run / 'code'}"]
  assert not pathlib.Path("/tmp/pwned").exists()
  assert "stand-in run on 0 done" in r.stdout  # worker 0's log is streamed
  assert "2 of 2 worker(s) reported: 0 failed" in r.stderr


def test_tpu_ships_code_without_git_or_run_folders_and_relaunch_runs_new_code(slice_):
  repo, _, home, launch, _ = slice_
  assert launch().returncode == 0
  (repo / "fakepkg" / "__init__.py").write_text('VERSION = "v2"\n')
  r = launch("--second")
  assert r.returncode == 0, r.stdout + r.stderr
  for i in range(2):
    first, second = [rec for rec in _records(home(i), i) if rec["phase"] == "start"]
    assert (first["version"], second["version"]) == ("v1", "v2")
    assert second["argv"][-1] == "--second"
    code = pathlib.Path(second["cwd"])
    assert code != pathlib.Path(first["cwd"])
    assert code.parent.parent == home(i) / "cpt_runs"  # a fresh folder, no nesting
    assert not list(code.rglob("junk.bin"))
    shipped = sorted(str(p.relative_to(code)) for p in code.rglob("*")
                     if "__pycache__" not in p.parts)  # the run's own bytecode
    assert shipped == ["fakepkg", "fakepkg/__init__.py", "fakepkg/main.py",
                       "fakepkg/workdir.py", "launch", "launch/tpu_pod.sh"]
    assert (home(i) / "cpt_runs" / "latest").resolve() == code.parent
    assert not list(home(i).glob("cpt_bundle_*"))  # the copied bundle is unpacked, removed


def test_tpu_venv_comes_first_on_path(slice_):
  _, _, home, launch, _ = slice_
  for i in range(2):
    python3 = home(i) / "venv" / "bin" / "python3"
    python3.parent.mkdir(parents=True)
    python3.write_text(f'#!/bin/sh\necho "$@" >> "$HOME/venv.log"\nexec {sys.executable} "$@"\n')
    python3.chmod(0o755)
  r = launch(extra_env={"CPT_VENV": "venv"})
  assert r.returncode == 0, r.stdout + r.stderr
  for i in range(2):
    (line,) = (home(i) / "venv.log").read_text().splitlines()
    assert line.startswith("-m fakepkg.main --config=configs/demo.py")
  r = launch(extra_env={"CPT_VENV": "../elsewhere"})
  assert r.returncode == 2 and "CPT_VENV must be" in r.stderr


def test_tpu_failing_run_fails_the_launch(slice_):
  _, _, home, launch, _ = slice_
  r = launch("--exit_status=3")
  assert r.returncode == 3, r.stdout + r.stderr
  assert "2 failed" in r.stderr
  for i in range(2):
    assert _records(home(i), i)[-1]["phase"] == "end"


def test_tpu_stops_stale_processes_and_removes_the_lockfile(slice_):
  _, world, home, launch, _ = slice_
  # A detached run still going from an earlier launch, on every worker ...
  r = launch("--sleep=600", extra_env={"CPT_DETACH": "1"})
  assert r.returncode == 0, r.stdout + r.stderr
  assert _wait_for(lambda: all(_records(home(i), i) for i in range(2)))
  old = [_records(home(i), i)[0]["pid"] for i in range(2)]
  # ... and a foreign process holding worker 1's TPU (and the lockfile written again).
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys,time; f=open(sys.argv[1]); time.sleep(600)",
       str(world / "worker1" / "dev" / "accel0")], start_new_session=True)
  assert _wait_for(lambda: any(
      os.readlink(f"/proc/{holder.pid}/fd/{fd}").endswith("accel0")
      for fd in os.listdir(f"/proc/{holder.pid}/fd")))
  for i in range(2):
    (world / f"worker{i}" / "tmp" / "libtpu_lockfile").write_text("stale")
  try:
    r = launch()
    assert r.returncode == 0, r.stdout + r.stderr
    assert holder.wait(timeout=10) == -signal.SIGTERM
    assert not any(_alive(pid) for pid in old)
    assert f"stopping process {holder.pid} (holds the TPU)" in r.stdout
    assert r.stdout.count("stopping run") == 2
    for i in range(2):
      assert not (world / f"worker{i}" / "tmp" / "libtpu_lockfile").exists()
      # The stopped run got SIGTERM (no "end" record) and its status was recorded.
      first_run = pathlib.Path(_records(home(i), i)[0]["cwd"]).parent
      assert (first_run / "exit_status").read_text().strip() == str(128 + signal.SIGTERM)
  finally:
    if holder.poll() is None:
      holder.kill()


def test_tpu_detached_run_survives_the_ssh_session_and_reports_its_status(slice_):
  _, _, home, launch, env = slice_
  r = launch("--sleep=1.5", "--exit_status=5", extra_env={"CPT_DETACH": "1",
                                                          "CPT_RUN_ID": "run-a"})
  assert r.returncode == 0, r.stdout + r.stderr
  assert "--status my-tpu us-east5-a run-a" in r.stderr
  status = ["bash", str(REPO / "launch" / "tpu_pod.sh"), "--status", "my-tpu", "us-east5-a",
            "run-a"]
  # Started, ssh gone (the stand-in sent SIGHUP to each session), still running.
  s = subprocess.run(status, env=env, capture_output=True, text=True, timeout=30)
  assert s.returncode == 3, s.stdout + s.stderr
  assert _wait_for(lambda: all(len(_records(home(i), i)) == 2 for i in range(2)))
  assert _wait_for(lambda: all(
      (home(i) / "cpt_runs" / "run-a" / "exit_status").exists() for i in range(2)))
  s = subprocess.run(status, env=env, capture_output=True, text=True, timeout=30)
  assert s.returncode == 5, s.stdout + s.stderr
  # --stop ends a detached run (SIGTERM: its status is 128 + 15).
  r = launch("--sleep=600", extra_env={"CPT_DETACH": "1", "CPT_RUN_ID": "run-b"})
  assert r.returncode == 0, r.stdout + r.stderr
  assert _wait_for(lambda: all(len(_records(home(i), i)) == 3 for i in range(2)))
  stop = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "--stop", "my-tpu",
                         "us-east5-a"], env=env, capture_output=True, text=True, timeout=30)
  assert stop.returncode == 0 and stop.stdout.count("stopping run run-b") == 2, stop.stdout
  s = subprocess.run(status[:-1] + ["run-b"], env=env, capture_output=True, text=True,
                     timeout=30)
  assert s.returncode == 128 + signal.SIGTERM, s.stdout + s.stderr
  # A launch into an existing run folder is refused.
  r = launch(extra_env={"CPT_RUN_ID": "run-a"})
  assert r.returncode != 0 and "choose another CPT_RUN_ID" in r.stdout


def test_tpu_worker_that_reports_nothing_fails_the_launch(slice_):
  _, _, _, launch, _ = slice_
  r = launch(extra_env={"FAKE_TPU_DESCRIBE_WORKERS": "3"})  # ssh reaches 2 of 3
  assert r.returncode == 1, r.stdout + r.stderr
  assert "1 worker(s) of my-tpu reported nothing" in r.stderr


def test_tpu_bad_arguments_are_refused_before_any_copy(slice_):
  _, world, _, launch, _ = slice_
  r = launch(extra_env={"CPT_RUN_ID": "../escape"})
  assert r.returncode == 2 and "CPT_RUN_ID must match" in r.stderr
  assert not (world / "gcloud.log").exists()


# ---------------------------------------------------------------------- SLURM


@pytest.fixture
def slurm(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  env = dict(os.environ, PATH=f"{STANDINS}:{os.environ['PATH']}", STANDIN_OUT=str(out),
             CPT_ENTRY=f"{sys.executable} {STANDINS / 'entry.py'}")
  for var in [k for k in env if k.startswith("SLURM_") or k == "CUDA_VISIBLE_DEVICES"]:
    del env[var]
  return out, env


def _srun(env, *opts, args=(), timeout=60):
  return subprocess.run(["srun", *opts, str(REPO / "launch" / "gpu_multinode.sh"),
                         "configs/demo.py", "gs://bucket/run", *args],
                        env=env, capture_output=True, text=True, timeout=timeout)


def test_srun_one_process_per_node_drives_all_its_gpus(slurm):
  out, env = slurm
  r = _srun(env, "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", args=TRICKY)
  assert r.returncode == 0, r.stdout + r.stderr
  for rank in range(2):
    (start, _) = _records(out, rank)
    assert start["argv"] == ["--config=configs/demo.py", "--workdir=gs://bucket/run",
                             "--config.distributed.initialize=yes", *TRICKY]
    assert start["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    assert start["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # left as SLURM set it
    assert start["env"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"


@pytest.mark.parametrize("opts,expected", [
    (("--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4"), ["0", "1", "2", "3"]),
    (("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=8"), ["0,1,2,3", "4,5,6,7"]),
    (("--nodes=2", "--ntasks-per-node=2", "--gpus-per-task=1"), ["0", "0", "0", "0"]),
])
def test_srun_tasks_split_the_gpus_of_their_node(slurm, opts, expected):
  out, env = slurm
  r = _srun(env, *opts)
  assert r.returncode == 0, r.stdout + r.stderr
  assert [_records(out, rank)[0]["env"]["JAX_LOCAL_DEVICE_IDS"]
          for rank in range(len(expected))] == expected


def test_srun_gpus_that_do_not_split_evenly_are_an_error(slurm):
  _, env = slurm
  r = _srun(env, "--nodes=1", "--ntasks-per-node=3", "--gpus-per-node=8")
  assert r.returncode == 2 and "8 GPUs on this node do not split over 3 tasks" in r.stderr


def test_srun_failing_task_fails_the_step(slurm):
  out, env = slurm
  r = _srun(env, "--nodes=2", args=["--exit_status=4"])
  assert r.returncode == 4
  assert all(_records(out, rank)[-1]["phase"] == "end" for rank in range(2))


def test_srun_environment_is_what_jax_distributed_detects(slurm):
  """Two tasks, no GPU: jax.distributed.initialize() with no arguments forms one
  2-process runtime from SLURM's variables alone."""
  out, env = slurm
  env.update(JAX_PLATFORMS="cpu", FAKE_SLURM_NODELIST="localhost",
             SLURM_JOB_ID=str(1000 + os.getpid() % 3000))
  r = _srun(env, "--nodes=2", args=["--jax_init"], timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  got = sorted((_records(out, rank)[0]["process_index"], _records(out, rank)[0]["process_count"])
               for rank in range(2))
  assert got == [(0, 2), (1, 2)]
  assert _records(out, 0)[0]["env"]["JAX_LOCAL_DEVICE_IDS"] is None  # no GPU seen


def test_outside_slurm_needs_all_three_variables(slurm):
  out, env = slurm
  script = str(REPO / "launch" / "gpu_multinode.sh")
  r = subprocess.run(["bash", script, "c.py", "w"], env=dict(env, COORDINATOR="h:1"),
                     capture_output=True, text=True)
  assert r.returncode != 0 and "NUM_PROCESSES" in r.stderr
  r = subprocess.run(["bash", script, "c.py", "w", "--x=(1)"],
                     env=dict(env, COORDINATOR="h:1", NUM_PROCESSES="2", PROCESS_ID="1"),
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert _records(out, 0)[0]["argv"][2:] == [
      "--config.distributed.initialize=yes", "--config.distributed.coordinator_address=h:1",
      "--config.distributed.num_processes=2", "--config.distributed.process_id=1", "--x=(1)"]


def test_sbatch_example_runs_its_header_shape_and_returns_the_status(slurm, tmp_path):
  out, env = slurm
  submit = tmp_path / "submit"
  shutil.copytree(REPO / "launch", submit / "launch")
  r = subprocess.run(["sbatch", "launch/slurm.sbatch", "configs/demo.py", "gs://bucket/run",
                      *TRICKY], cwd=submit, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr
  job = r.stdout.split()[-1]
  log = (submit / f"cpt_jax-{job}.out").read_text()
  assert "process 1 on" in log
  for rank in range(2):  # the header: 2 nodes x 1 task x 8 GPUs
    start = _records(out, rank)[0]
    assert start["argv"][3:] == TRICKY
    assert start["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
  assert not _records(out, 2)
  r = subprocess.run(["sbatch", "--nodes=1", "launch/slurm.sbatch", "c.py", "w",
                      "--exit_status=6"], cwd=submit, env=env, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 6


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
def test_shellcheck():
  scripts = [str(p) for p in (REPO / "launch").iterdir()]
  r = subprocess.run(["shellcheck", "-s", "bash", *scripts], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout
