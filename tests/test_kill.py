"""`kill -9` of `python -m cpt_jax.main` at seeded random moments and during a checkpoint
save, each followed by a resume: the final params, optimizer state and losses equal an
uninterrupted run's bit for bit, and the workdir is left usable (a killed run's lock is
stale and taken over; a save cut short is ignored)."""

import glob
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests.helpers import REPO
from tests.helpers import cli_command
from tests.helpers import run_cli
from tests.helpers import write_cli_config
from tests.helpers import write_corpus

STEPS = 12
SETTINGS = {"train.steps": STEPS, "train.log_every": 2, "train.checkpoint_every": 2,
            "train.keep_checkpoints": 3, "train.async_checkpoints": True}
TMP = "*.orbax-checkpoint-tmp*"  # Orbax's folder of a save in progress


def _final_state(workdir):
  """The final step's saved tree (params, optimizer state, step) as numpy arrays."""
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(STEPS),
                                                       "state"))
  return jax.tree.map(np.asarray, tree)


def _records(workdir, name):
  with open(os.path.join(workdir, name), encoding="utf-8") as f:
    return [json.loads(l) for l in f if l.strip()]


def _start(config, workdir):
  argv, env = cli_command(config, workdir)
  return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)


def _kill_during_save(config, workdir, timeout=120.0):
  """Starts a run and SIGKILLs it as soon as a save is in progress; whether one was cut."""
  proc = _start(config, workdir)
  pattern = os.path.join(workdir, "checkpoints", TMP)
  t0 = time.monotonic()
  while proc.poll() is None and time.monotonic() - t0 < timeout:
    if glob.glob(pattern):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.0005)
  proc.wait()
  return proc.returncode == -signal.SIGKILL and bool(glob.glob(pattern))


def _kill_after(config, workdir, step, delay, timeout=120.0):
  """Starts a run and SIGKILLs it `delay` seconds after metrics.jsonl reaches `step` (unless
  it finished first); whether it was killed."""
  proc = _start(config, workdir)
  t0 = time.monotonic()
  while proc.poll() is None and time.monotonic() - t0 < timeout:
    try:
      steps = [r["step"] for r in _records(workdir, "metrics.jsonl")]
    except (OSError, ValueError):  # not written yet, or a line being written
      steps = []
    if steps and max(steps) >= step:
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005)
  proc.wait()
  return proc.returncode == -signal.SIGKILL


def test_kill_9_at_random_moments_and_during_a_save_resumes_bit_for_bit(tmp_path):
  rng = np.random.default_rng(19)
  corpus = write_corpus(tmp_path / "corpus")
  config = write_cli_config(tmp_path, corpus, **SETTINGS)
  t0 = time.monotonic()
  status, _, err = run_cli(config, tmp_path / "ref")
  ref_seconds = time.monotonic() - t0
  assert status == 0, err

  killed = tmp_path / "killed"
  kills = []
  for _ in range(3):  # a save in progress (Orbax's temporary folder exists) cut short
    cut = _kill_during_save(config, killed)
    kills.append("save" if cut else "save-missed")
    if cut:
      break
  assert "save" in kills, kills
  # Random moments: a seeded step of the run, then a seeded delay (mid-step, mid-save...).
  for step in sorted(rng.choice(np.arange(2, STEPS, 2), size=2, replace=False)):
    delay = float(rng.uniform(0.0, 0.5))
    if _kill_after(config, killed, int(step), delay):
      kills.append(f"step {step} + {delay:.2f}s")
  assert len(kills) >= 3, kills
  status, out, err = run_cli(config, killed)
  assert status == 0, err
  assert "resumed from step" in out or "random init" in out, out

  ref, got = _final_state(tmp_path / "ref"), _final_state(killed)
  assert jax.tree.structure(ref) == jax.tree.structure(got)
  jax.tree.map(np.testing.assert_array_equal, got, ref)
  keys = ("step", "loss", "domain_loss", "weights")
  want = [{k: r[k] for k in keys} for r in _records(tmp_path / "ref", "metrics.jsonl")]
  assert [{k: r[k] for k in keys} for r in _records(killed, "metrics.jsonl")] == want
  want = [{k: v for k, v in r.items() if k != "time"}
          for r in _records(tmp_path / "ref", "eval.jsonl")]
  assert [{k: v for k, v in r.items() if k != "time"}
          for r in _records(killed, "eval.jsonl")] == want
  assert not os.path.exists(killed / "run.lock")
  print(f"kills: {kills}; reference run {ref_seconds:.1f} s; "
        f"test {time.monotonic() - t0:.1f} s")
