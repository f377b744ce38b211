"""Staged runs: warm starts between stages, skipping, resuming, and the report."""

import json
import math
import os

import jax
import pytest

from cpt_jax import config as config_lib
from cpt_jax import run as run_lib
from cpt_jax import stages
from cpt_jax.eval import report as report_lib
from tests.helpers import tiny_config, write_corpus

REPORT_KEYS = ("stages", "domains", "loss_matrix", "bpb_matrix", "bwt", "fwt", "forgetting")


def staged_config(corpus):
  c = tiny_config()
  c.data.update(corpus_dir=str(corpus), new="", replay="")
  c.sharding.mesh_shape = (1, 1, 1)
  c.train.update(steps=4, log_every=2, checkpoint_every=2, eval_batches=2)
  c.stage_order = "pretrain,cpt"
  c.stages.pretrain = {"data": {"new": "alpha,beta"}}
  c.stages.cpt = {"init_from": "pretrain",
                  "data": {"new": "gamma", "replay": "alpha", "distill": "beta",
                           "weights": "gamma=0.5,alpha=0.25,beta=0.25"},
                  "objective": {"lambda_kd": 1.0}}
  return c


class _Crash(Exception):
  pass


def test_two_stage_run_report_skip_and_resume(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")
  config = staged_config(corpus)
  config_lib.validate_config(config)
  work = tmp_path / "run"

  def crash_in_cpt(step, record, pipeline):
    if "gamma" in record.get("domain_loss", {}) and step == 4:
      raise _Crash()

  with pytest.raises(_Crash):
    run_lib.run(config, str(work), devices=jax.devices()[:1], on_metrics=crash_in_cpt)
  assert os.path.exists(work / "stages" / "pretrain" / "summary.json")
  assert not os.path.exists(work / "stages" / "cpt" / "summary.json")
  baseline_path = work / "baseline.json"  # random init, evaluated once before the stages
  baseline_mtime = os.path.getmtime(baseline_path)

  report = run_lib.run(config, str(work), devices=jax.devices()[:1])
  cpt = json.load(open(work / "stages" / "cpt" / "summary.json"))
  assert cpt["init"] == "resumed from step 2"  # interrupted stage resumed, not restarted
  assert cpt["train_tokens"] == 4 * 8 * 32 and cpt["steps_run"] == 2  # whole-stage accounting
  for key in REPORT_KEYS:
    assert key in report, key
  assert report["domains"] == ["alpha", "beta", "gamma"]
  assert len(report["loss_matrix"]) == 2 and len(report["loss_matrix"][0]) == 3
  assert set(report["forgetting"]) == {"alpha", "beta"}
  # fwt: cpt trains gamma as new; b_gamma - (pretrain's loss on gamma), the random-init
  # loss of the seed's model read from baseline.json (not recomputed on resume).
  assert os.path.getmtime(baseline_path) == baseline_mtime
  b = json.load(open(baseline_path))["eval"]
  assert set(b) == {"alpha", "beta", "gamma"}
  for j, d in enumerate(report["domains"]):  # near-uniform over 259 ids; worse than trained
    assert b[d]["loss"] == pytest.approx(math.log(259), abs=0.1)
    assert b[d]["loss"] > max(row[j] for row in report["loss_matrix"])
  assert report["fwt"] == pytest.approx(b["gamma"]["loss"] - report["loss_matrix"][0][2])
  assert report["fwt"] > 0.01  # 4 pretrain steps on alpha, beta already help gamma
  assert report["baseline"]["gamma"]["loss"] == b["gamma"]["loss"]
  pre = json.load(open(work / "stages" / "pretrain" / "summary.json"))
  # No teacher in the pretrain: no step counts as skipping it.
  assert pre["teacher_skipped_steps"] == 0 and pre["teacher_rows"] == 0
  assert cpt["teacher_skipped_steps"] + (cpt["teacher_rows"] > 0) <= 4
  cfg = json.load(open(work / "stages" / "cpt" / "config.json"))
  assert cfg["optimizer"]["schedule"] == "rewarm_cosine"
  cpt_stage = report["stages"][1]
  assert cpt_stage["tokens"]["teacher"] > 0 and cpt_stage["tflops"]["teacher"] > 0
  assert set(cpt_stage["tflops"]) == {"train", "teacher", "selection"}
  assert report["comparison"][0]["distill"] == ["beta"]
  md = open(work / "report.md").read()
  assert "Loss matrix" in md and "domain_loss.png" in md
  assert "random init (b_d)" in md and "b_d - L[stage before][d]" in md
  assert os.path.getsize(work / "domain_loss.png") > 1000
  assert os.path.getsize(work / "mixture_weights.png") > 1000
  # A finished run is skipped stage by stage; the report is rebuilt identically.
  again = run_lib.run(config, str(work), devices=jax.devices()[:1])
  assert again["loss_matrix"] == report["loss_matrix"]


def test_continued_stage_rewarms_from_parent_floor_by_default():
  c = staged_config("/nonexistent")
  cfg = stages._default_rewarm(c, "cpt", "pretrain", config_lib.stage_config(c, "cpt"))  # pylint: disable=protected-access
  assert cfg.optimizer.schedule == "rewarm_cosine"
  assert cfg.optimizer.init_lr == pytest.approx(c.optimizer.lr * c.optimizer.final_lr_fraction)
  # A parent stopped early by its hard budget ended at its last logged LR.
  stopped = {"budget": {"stopped_at": 6}, "last": {"learning_rate": 7e-4}}
  cfg = stages._default_rewarm(c, "cpt", "pretrain", config_lib.stage_config(c, "cpt"), stopped)  # pylint: disable=protected-access
  assert cfg.optimizer.init_lr == pytest.approx(7e-4)
  c.stages.cpt.optimizer = {"schedule": "wsd"}
  cfg = stages._default_rewarm(c, "cpt", "pretrain", config_lib.stage_config(c, "cpt"))  # pylint: disable=protected-access
  assert cfg.optimizer.schedule == "wsd"


def test_a_stage_after_a_constant_schedule_rewarms_from_its_peak():
  """A constant parent ended at its peak LR, not at peak x final_lr_fraction (the decaying
  schedules' floor); the code before this read every parent as decayed."""
  c = staged_config("/nonexistent")
  c.stages.pretrain.optimizer = {"schedule": "constant", "lr": 2e-3}
  cfg = stages._default_rewarm(c, "cpt", "pretrain", config_lib.stage_config(c, "cpt"))  # pylint: disable=protected-access
  assert cfg.optimizer.schedule == "rewarm_cosine"
  assert cfg.optimizer.init_lr == pytest.approx(2e-3)
  # A continued stage that sets no schedule re-warms and decays: its child starts at the floor.
  c.stage_order = "pretrain,cpt,cpt2"
  c.stages.cpt2 = {"init_from": "cpt"}
  cfg = stages._default_rewarm(c, "cpt2", "cpt", config_lib.stage_config(c, "cpt2"))  # pylint: disable=protected-access
  floor = config_lib.stage_config(c, "cpt").optimizer
  assert cfg.optimizer.init_lr == pytest.approx(floor.lr * floor.final_lr_fraction)


def test_stage_validation_errors():
  c = staged_config("/nonexistent")
  c.stages.cpt.init_from = "later"
  with pytest.raises(ValueError, match="init_from='later' must name an earlier stage"):
    config_lib.validate_stages(c)
  c = staged_config("/nonexistent")
  c.stages.cpt.train = {"stepz": 3}
  with pytest.raises(ValueError, match="stages.cpt.train.stepz"):
    config_lib.validate_stages(c)
  c = staged_config("/nonexistent")
  c.stage_order = "pretrain"
  with pytest.raises(ValueError, match="does not list"):
    config_lib.stage_names(c)


def fake_summaries():
  """Two stages over domains a, b: 'pre' trains a; 'cpt' trains b from it, replaying a."""
  ev = lambda la, lb: {"a": {"loss": la, "bpb": la / 2}, "b": {"loss": lb, "bpb": lb / 2}}
  common = {"domains": ["a", "b"], "step": 4, "seconds": 1.0, "train_tokens": 1024,
            "teacher_rows": 0, "train_tflops": 0.5, "teacher_tflops": 0.0}
  return {"pre": {**common, "eval": ev(1.0, 3.0), "roles": ["new", "eval"], "learned": ["a"],
                  "init_from": None},
          "cpt": {**common, "eval": ev(1.5, 1.0), "roles": ["replay", "new"],
                  "learned": ["a", "b"], "init_from": "pre"}}


def test_only_process_0_writes_shared_files(tmp_path, monkeypatch):
  config = staged_config("/nonexistent")
  baseline = {"a": {"loss": 5.0, "bpb": 2.5}, "b": {"loss": 4.0, "bpb": 2.0}}

  def write_all(workdir, index):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    workdir.mkdir()
    report = report_lib.build_report(config, ["pre", "cpt"], fake_summaries(), ["a", "b"],
                                     str(workdir), baseline=baseline)
    stages._write_json(str(workdir / stages.SUMMARY), {"step": 4})  # pylint: disable=protected-access
    return report

  other = write_all(tmp_path / "p1", 1)
  assert not os.listdir(tmp_path / "p1")  # nothing written, not even a temporary file
  lead = write_all(tmp_path / "p0", 0)
  assert sorted(os.listdir(tmp_path / "p0")) == ["domain_loss.png", "mixture_weights.png",
                                                 "report.json", "report.md", "summary.json"]
  assert other == lead  # every process returns the same report
  # fwt = b_b - L[pre][b] = 4.0 - 3.0; bwt = L[pre][a] - L[cpt][a] = 1.0 - 1.5
  assert (other["fwt"], other["bwt"]) == (1.0, -0.5)
