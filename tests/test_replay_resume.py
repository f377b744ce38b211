"""Online replay with a kept teacher across a resume; the plan's timing agreed by process 0."""

import jax
import numpy as np
import pytest

from cpt_jax import stages
from cpt_jax.replay import manager as manager_lib
from cpt_jax.train import metrics as metrics_lib
from cpt_jax.train import trainer as trainer_lib
from tests.helpers import tiny_config, write_corpus


def _config(corpus, tmp_path, **replay):
  c = tiny_config()
  c.data.update(corpus_dir=str(corpus), cache_dir=str(tmp_path / "cache"))
  c.sharding.mesh_shape = (1, 1, 1)
  c.train.update(steps=8, log_every=2, checkpoint_every=4, eval_batches=1)
  c.replay.update(strategy="online", fraction=0.5, selection_fraction=0.5, online_every=2,
                  online_pool=40, online_swap=0.5, **replay)
  return c


class _Crash(Exception):
  pass


def _crash_at_6(step, record, pipeline):
  if step == 6:
    raise _Crash()


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir)}


def test_online_replay_with_kept_teacher_resumes_like_an_uninterrupted_run(tmp_path):
  """replay_kd keeps the teacher in the donated state; the refresh after a resume needs M."""
  corpus = write_corpus(tmp_path / "corpus", docs=60)
  dev = jax.devices()[:1]
  base = _config(corpus, tmp_path)
  base.replay.strategy = ""
  base.train.update(steps=2, checkpoint_every=2)
  stages.train(base, str(tmp_path / "base"), devices=dev)  # the stage's starting model
  c = _config(corpus, tmp_path)
  c.train.init_checkpoint = str(tmp_path / "base")
  c.objective.replay_kd = 1.0
  ref = stages.train(c, str(tmp_path / "ref"), devices=dev)
  assert ref["selection"]["online"]["refreshes"] == 3  # at steps 2, 4, 6
  with pytest.raises(_Crash):  # stops after the step-4 checkpoint, before the step-6 refresh
    stages.train(c, str(tmp_path / "run"), devices=dev, on_metrics=_crash_at_6)
  out = stages.train(c, str(tmp_path / "run"), devices=dev)
  assert out["init"] == "resumed from step 4"
  assert out["selection"]["online"] == ref["selection"]["online"]
  ref_loss, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
  assert sorted(ref_loss) == [2, 4, 6, 8]
  for s in (6, 8):
    assert got[s] == pytest.approx(ref_loss[s], abs=1e-6), s
  np.testing.assert_allclose(out["eval"]["beta"]["loss"], ref["eval"]["beta"]["loss"], rtol=1e-5)


def test_plan_timing_and_selection_files_come_from_process_0(tmp_path, monkeypatch):
  """The measured rate is process 0's on every process; only process 0 writes files."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  corpus = write_corpus(tmp_path / "corpus", docs=60)
  c = _config(corpus, tmp_path, max_seconds=1e6)
  trainer = stages.make_trainer(c, str(tmp_path / "run"), devices=jax.devices()[:1])
  try:
    trainer.prepare()
    state, manager = trainer.state, trainer.hook("replay").manager
    x = np.array([3.0, 0.25])

    def not_called(v):
      raise AssertionError("broadcast with one process")

    with monkeypatch.context() as m:  # one process: the value itself, no collective
      m.setattr(multihost_utils, "broadcast_one_to_all", not_called)
      assert manager_lib._from_process_0(x) is x  # pylint: disable=protected-access
    with monkeypatch.context() as m:  # two: what the broadcast from process 0 returns
      m.setattr(jax, "process_count", lambda: 2)
      m.setattr(multihost_utils, "broadcast_one_to_all", lambda v: np.array([7.0, 0.5]))
      np.testing.assert_array_equal(
          manager_lib._from_process_0(x), [7.0, 0.5])  # pylint: disable=protected-access
    with monkeypatch.context() as m:  # the plan uses the agreed rate and seconds
      m.setattr(manager_lib, "_from_process_0", lambda v: np.array([2e9, 3.5]))
      plan = manager._make_plan(trainer.model_params(state.params))  # pylint: disable=protected-access
    assert plan["flops_per_second"] == 2e9 and plan["measure_seconds"] == 3.5
    assert plan["seconds"]["new"] == pytest.approx(plan["tflops"]["new"] * 1e12 / 2e9)

    sel_dir = tmp_path / "run" / "replay_selection"
    assert (sel_dir / "selection.jsonl").is_file()  # written at the start (process 0)
    for f in sel_dir.iterdir():
      f.unlink()
    with monkeypatch.context() as m:
      m.setattr(jax, "process_index", lambda: 1)
      manager._write()  # pylint: disable=protected-access
    assert not list(sel_dir.iterdir())
    manager._write()  # pylint: disable=protected-access
    assert sorted(f.name for f in sel_dir.iterdir()) == ["meta.json", "selection.jsonl"]
  finally:
    trainer.close()
