"""SIGTERM: the run saves at the next step boundary, exits 0, and the rerun resumes.

In process, `preemption.request()` (what the SIGTERM handler calls) stops the run after
the next step with that step's checkpoint; the resumed run's per-step losses are the
uninterrupted run's. Through the command line a real SIGTERM, sent mid-run, ends the
process with status 0 and a checkpoint. (Several processes agreeing on the step:
tests/test_multiprocess.py sends SIGTERM to one of two.)
"""

import json
import os
import signal
import subprocess
import time

import pytest

from cpt_jax.train import checkpoint as ckpt_lib
from cpt_jax.train import metrics as metrics_lib
from cpt_jax.train import preemption
from tests import helpers


def _config(corpus, steps=8):
  c = helpers.one_device_config(corpus)
  c.train.update(steps=steps, log_every=1, checkpoint_every=100)
  return c


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(workdir))}


def _request_after(at):
  def on_metrics(step, record, pipeline):
    del record, pipeline
    if step == at:
      preemption.request()
  return on_metrics


def test_a_request_saves_the_next_step_and_the_rerun_resumes_it(tmp_path):
  corpus = helpers.write_corpus(tmp_path / "corpus")
  whole = helpers.train_one_device(_config(corpus), tmp_path / "whole")
  work = tmp_path / "run"
  with pytest.raises(preemption.Preempted, match="step 4") as e:
    helpers.train_one_device(_config(corpus), work, on_metrics=_request_after(3))
  assert e.value.step == 4  # the step after the request: its boundary
  assert ckpt_lib.Checkpointer(str(work / "checkpoints")).all_steps() == [4]
  assert sorted(_losses(work)) == [1, 2, 3, 4]
  again = helpers.train_one_device(_config(corpus), work)
  assert again["init"] == "resumed from step 4" and again["step"] == 8
  ref, got = _losses(tmp_path / "whole"), _losses(work)
  assert sorted(got) == sorted(ref) == list(range(1, 9))
  for s, loss in ref.items():
    assert got[s] == loss, s  # bit for bit: the same batches from the same state
  assert again["eval"] == whole["eval"]


def test_sigterm_to_the_command_line_saves_and_exits_0(tmp_path):
  corpus = helpers.write_corpus(tmp_path / "corpus")
  config = helpers.write_cli_config(tmp_path, corpus, **{"train.steps": 100000,
                                                         "train.log_every": 1,
                                                         "train.checkpoint_every": 100000})
  work = tmp_path / "run"
  argv, env = helpers.cli_command(config, work)
  p = subprocess.Popen(argv, cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,  # pylint: disable=consider-using-with
                       stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
      if os.path.exists(work / "metrics.jsonl") and len(_losses(work)) >= 2:
        break
      time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, err[-3000:]
  line = next(l for l in out.splitlines() if "preempted: saved the checkpoint of step" in l)
  step = int(line.split("of step ")[1].split()[0])
  assert ckpt_lib.Checkpointer(str(work / "checkpoints")).all_steps() == [step]
  history = [json.loads(l) for l in open(work / "config_history.jsonl", encoding="utf-8")]
  assert len(history) == 1  # one invocation; the rerun would add its resume
