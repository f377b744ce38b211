"""The workdir: one writer at a time, the run's recorded settings, metrics that match the run."""

import copy
import json
import os
import socket
import subprocess
import sys
import time

import jax
import pytest

from cpt_jax import run as run_lib
from cpt_jax import stages
from cpt_jax.train import checkpoint as ckpt_lib
from cpt_jax.train import metrics as metrics_lib
from cpt_jax.train import trainer as trainer_lib
from cpt_jax.train import workdir as workdir_lib
from tests.test_stages import staged_config
from tests.test_train import _Crash, _config, _train, corpus  # pylint: disable=unused-import


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


# ------------------------------------------------------------------------------------ lock


def test_a_second_run_in_a_busy_workdir_fails_at_start(corpus, tmp_path, capsys):
  config = _config(corpus, **{"train.steps": 2})
  work, dev = tmp_path / "run", jax.devices()[:1]
  first = stages.make_trainer(config, str(work), devices=dev)
  try:
    holder = json.loads((work / "run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert holder["started"]
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=rf"in use by another run: pid {os.getpid()} on host "):
      _train(config, work)
    assert not (work / "metrics.jsonl").exists() and not (work / "config.json").exists()
  finally:
    first.close()
  assert not (work / "run.lock").exists()  # released by close
  # A lock whose process died (kill -9) on this host is stale: taken over, with a log line.
  pid = _dead_pid()
  (work / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                             "started": "2020-01-01T00:00:00+00:00"}))
  assert _train(config, work)["step"] == 2
  assert f"taking over a stale lock of pid {pid} on host" in capsys.readouterr().out
  assert not (work / "run.lock").exists()
  # A trainer that fails while it is built releases the lock.
  with pytest.raises(AttributeError):
    trainer_lib.Trainer(config, str(tmp_path / "broken"), pipeline=object(), devices=dev)
  assert not (tmp_path / "broken" / "run.lock").exists()


def test_lock_of_another_host_is_stale_only_without_a_heartbeat(tmp_path):
  path = tmp_path / "run.lock"
  path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
  with pytest.raises(workdir_lib.WorkdirLockedError, match="pid 1 on host elsewhere"):
    workdir_lib.WorkdirLock(str(tmp_path), stale_minutes=30).acquire()
  old = time.time() - 31 * 60
  os.utime(path, (old, old))
  with pytest.raises(workdir_lib.WorkdirLockedError):  # 0: never take another host's lock
    workdir_lib.WorkdirLock(str(tmp_path), stale_minutes=0).acquire()
  with workdir_lib.WorkdirLock(str(tmp_path), stale_minutes=30) as lock:
    assert json.loads(path.read_text())["pid"] == os.getpid() and lock.held()
    with pytest.raises(workdir_lib.WorkdirLockedError):  # this process holds it
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert not path.exists()


# -------------------------------------------------------------------------------- identity


def test_a_rerun_with_other_settings_stops_unless_continue(corpus, tmp_path):
  work = tmp_path / "run"
  config = _config(corpus, **{"train.steps": 4})
  config.optimizer.lr = 3e-4
  _train(config, work)
  recorded = (work / "config.json").read_text()
  changed = copy.deepcopy(config)
  changed.optimizer.lr = 1.1e-3
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r"from step 4 would change:\n  optimizer\.lr: 0\.0003 -> 0\.0011\n"):
    _train(changed, work)
  assert (work / "config.json").read_text() == recorded
  assert [r["step"] for r in metrics_lib.read_metrics(work)] == [2, 4]
  assert ckpt_lib.Checkpointer(str(work / "checkpoints")).all_steps() == [4]

  longer = copy.deepcopy(config)  # allow-list: train.steps may grow
  longer.train.steps = 6
  out = _train(longer, work)
  assert out["init"] == "resumed from step 4" and out["step"] == 6

  changed.train.steps = 4  # shorter than recorded: not on the allow-list
  with pytest.raises(workdir_lib.ConfigChangedError, match=r"train\.steps: 6 -> 4 \(train"):
    _train(changed, work)

  changed.train.update(steps=8, on_config_change="continue")
  out = _train(changed, work)
  assert out["init"] == "resumed from step 6" and out["step"] == 8
  lr = {r["step"]: r["learning_rate"] for r in metrics_lib.read_metrics(work)}
  assert lr[6] == pytest.approx(3e-4) and lr[8] == pytest.approx(1.1e-3)
  assert (work / "config.json").read_text() == recorded  # the first invocation's
  history = [json.loads(line) for line in open(work / "config_history.jsonl")]
  assert [h["step"] for h in history] == [0, 4, 6] and history[0]["started"]
  assert "changes" not in history[0]
  assert history[1]["changes"] == {"train.steps": {"old": 4, "new": 6, "by": "allow-list"}}
  assert history[2]["changes"]["optimizer.lr"] == {
      "old": 0.0003, "new": 0.0011, "by": "on_config_change=continue"}
  assert [c["step"] for c in out["config_changes"]] == [4, 6]
  assert "optimizer.lr" in out["config_changes"][1]["changes"]
  changed.train.on_config_change = "stop"  # the accepted settings are now the recorded ones
  assert _train(changed, work)["steps_run"] == 0

  # Changed mixture weights follow the same rule (a plain restore would keep the old ones).
  mixed = copy.deepcopy(changed)
  mixed.data.weights = "alpha=0.5,beta=0.25,gamma=0.25"
  mixed.train.steps = 10
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r'data\.weights: "" -> "alpha=0\.5,beta=0\.25,gamma=0\.25"'):
    _train(mixed, work)
  mixed.train.on_config_change = "continue"
  _train(mixed, work)
  weights = {r["step"]: r["weights"] for r in metrics_lib.read_metrics(work)}
  assert weights[10] == pytest.approx({"alpha": 0.5, "beta": 0.25, "gamma": 0.25})
  assert weights[8] != pytest.approx(weights[10])


def test_a_workdir_without_a_checkpoint_starts_afresh_with_the_new_settings(corpus, tmp_path):
  """Nothing of an invocation that ended before its first checkpoint survives: the next one
  is a fresh start (config.json replaced, said in the history), not a resume."""
  work = tmp_path / "run"
  config = _config(corpus, **{"train.steps": 2})
  config.optimizer.warmup_steps = 1

  def crash(step, record, pipeline):
    raise _Crash()

  with pytest.raises(_Crash):  # at step 2, before its save
    _train(config, work, on_metrics=crash)
  assert ckpt_lib.Checkpointer(str(work / "checkpoints")).all_steps() == []
  config.optimizer.lr = 1e-3
  assert _train(config, work)["init"] == "random init"
  assert json.loads((work / "config.json").read_text())["optimizer"]["lr"] == 0.001
  history = [json.loads(line) for line in open(work / "config_history.jsonl")]
  assert [h.get("started") for h in history] == [True, True]
  assert history[1]["replaced"] == {"optimizer.lr": {"old": 0.003, "new": 0.001}}
  records = metrics_lib.read_metrics(work)
  assert [r["step"] for r in records] == [2]
  assert records[0]["learning_rate"] == pytest.approx(1e-3)


# --------------------------------------------------------------------------------- metrics


def _keys(record: dict, prefix: str = "") -> set[str]:
  out = set()
  for k, v in record.items():
    out |= _keys(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k}
  return out


def _tensorboard_steps(folder, tag: str) -> list[int]:
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  steps = []
  for name in sorted(os.listdir(folder)):
    for event in event_file_loader.EventFileLoader(str(folder / name)).Load():
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)


def test_resumed_metrics_read_as_one_uninterrupted_run(corpus, tmp_path):
  """A crash after the step-4 checkpoint leaves records of steps 6 and 8 (eval: 6); the
  resume drops them, so every file matches the uninterrupted run step for step."""
  config = _config(corpus, **{"train.eval_every": 2})  # 8 steps, logs every 2, saves every 4
  _train(config, tmp_path / "ref")

  def crash_at_8(step, record, pipeline):
    if step == 8:
      raise _Crash()

  run = tmp_path / "run"
  with pytest.raises(_Crash):
    _train(config, run, on_metrics=crash_at_8)
  assert not (run / "run.lock").exists()  # released on the exception
  assert [r["step"] for r in metrics_lib.read_metrics(run)] == [2, 4, 6, 8]
  assert [r["step"] for r in metrics_lib.read_metrics(run, "eval")] == [2, 4, 6]
  assert _train(config, run)["init"] == "resumed from step 4"

  want, got = metrics_lib.read_metrics(tmp_path / "ref"), metrics_lib.read_metrics(run)
  assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4, 6, 8]
  assert len({frozenset(_keys(r)) for r in want + got}) == 1  # every record the same keys
  for g, w in zip(got, want):
    assert g["loss"] == pytest.approx(w["loss"], abs=1e-6), g["step"]
    assert g["domain_loss"] == pytest.approx(w["domain_loss"], abs=1e-6), g["step"]
    assert g["data"] == w["data"], g["step"]
  want, got = (metrics_lib.read_metrics(tmp_path / "ref", "eval"),
               metrics_lib.read_metrics(run, "eval"))
  assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4, 6, 8]
  for g, w in zip(got, want):
    assert {d: g[d]["loss"] for d in ("alpha", "beta", "gamma")} == pytest.approx(
        {d: w[d]["loss"] for d in ("alpha", "beta", "gamma")}, abs=1e-5), g["step"]
  assert _tensorboard_steps(run / "tensorboard", "loss") == [2, 4, 6, 8]


def test_truncation_drops_later_records_and_a_line_cut_by_a_crash(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6))
                  + '{"step": 8, "lo')
  assert metrics_lib.truncate_jsonl(str(path), 4) == 2
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4]
  assert metrics_lib.truncate_jsonl(str(path), 4) == 0


# ---------------------------------------------------------------------------------- stages


def _staged(corpus):
  """Two stages of 2 steps, each saving at its end; cpt replays alpha (no teacher)."""
  c = staged_config(corpus)
  c.train.update(steps=2, eval_batches=1)
  c.stages.cpt = {"init_from": "pretrain", "data": {"new": "gamma", "replay": "alpha"}}
  return c


def test_a_changed_finished_stage_is_not_reported_as_current(corpus, tmp_path, capsys):
  work, dev = tmp_path / "run", jax.devices()[:1]
  config = _staged(corpus)
  run_lib.run(config, str(work), devices=dev)
  report_md = (work / "report.md").read_text()
  capsys.readouterr()

  changed = copy.deepcopy(config)
  changed.stages.cpt.optimizer = {"lr": 1.1e-3}
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r"stage cpt: .*\n  optimizer\.lr: 0\.003 -> 0\.0011\n"):
    run_lib.run(changed, str(work), devices=dev)
  assert "finished earlier, skipped" not in capsys.readouterr().out
  assert (work / "report.md").read_text() == report_md

  longer = copy.deepcopy(config)  # pretrain would train on: cpt came from its old model
  longer.stages.pretrain.train = {"steps": 4}
  with pytest.raises(workdir_lib.ConfigChangedError, match="pretrain trains further"):
    run_lib.run(longer, str(work), devices=dev)
  assert ckpt_lib.Checkpointer(str(work / "stages" / "pretrain" / "checkpoints")).all_steps() \
      == [2]  # checked before anything trained

  changed.train.on_config_change = "continue"
  report = run_lib.run(changed, str(work), devices=dev)
  out = capsys.readouterr().out
  assert "stage pretrain: finished earlier, skipped" in out
  assert "stage cpt: finished earlier; its settings changed" in out
  cpt = report["stages"][1]["config_changes"]
  assert cpt[0]["step"] == 2 and cpt[0]["changes"]["optimizer.lr"]["new"] == 0.0011
  md = (work / "report.md").read_text()
  assert "Settings changed during a stage" in md and "| cpt | 2 | optimizer.lr |" in md
  assert json.loads((work / "stages" / "cpt" / "summary.json").read_text())["config_changes"]
