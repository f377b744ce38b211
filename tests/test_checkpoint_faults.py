"""Faults around checkpoints: damaged steps, a failing final evaluation, divergence.

Each damage case is made on the real Orbax layout of a tiny run (see the module
docstring of cpt_jax/train/checkpoint.py); RELIABILITY.md lists them with their outcome.
"""

import glob
import os
import re
import shutil

import jax
import numpy as np
import pytest

from cpt_jax import stages
from cpt_jax.train import checkpoint as ckpt_lib
from cpt_jax.train import divergence as divergence_lib
from cpt_jax.train import metrics as metrics_lib
from cpt_jax.train import state as state_lib
from cpt_jax.train import trainer as trainer_lib
from tests.helpers import one_device_config as _config
from tests.helpers import train_one_device as _train
from tests.helpers import tiny_config
from tests.helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


def _run(config, workdir):
  """(summary, final params) of a run."""
  trainer = stages.make_trainer(config, str(workdir), devices=jax.devices()[:1])
  try:
    return trainer.run(), jax.device_get(trainer.state.params)
  finally:
    trainer.close()


def _saved_params(config, workdir) -> dict[int, object]:
  """{step: params} of every checkpoint kept in `workdir`."""
  trainer = stages.make_trainer(config, str(workdir), devices=jax.devices()[:1])
  ctx = trainer.ctx
  abstract = state_lib.abstract_state(ctx.model, ctx.layout, ctx.state_sh, config.data.seq_len,
                                      ctx.frozen_keys)
  try:
    return {s: jax.device_get(trainer.checkpointer.restore(abstract, s)[0].params)
            for s in trainer.checkpointer.all_steps()}
  finally:
    trainer.close()


def _finite(params) -> bool:
  return all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(params))


# ------------------------------------------------------------------ damaged checkpoints


def _largest_data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")),
             key=os.path.getsize)


def _truncate(path, size=None):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2 if size is None else size)


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


# case -> (damage(step_dir), tag of the folder it is moved to, what the log says)
DAMAGE = {
    "truncated_array_file": (lambda d: _truncate(_largest_data_file(d)), "bad-array",
                             r"array \S+ in the database .*/4/state/ does not read: Requested byte "
                             r"range .*\(data file .*/4/state/ocdbt.process_0/d/\w+\)"),
    "deleted_array_file": (lambda d: os.remove(_largest_data_file(d)), "bad-array",
                           r"array \S+ in the database .*/4/state/ does not read"),
    "deleted_METADATA": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
                         "missing-file", r"/4/state/_METADATA is missing"),
    "truncated_METADATA": (lambda d: _truncate(os.path.join(d, "state", "_METADATA"), 100),
                           "bad-json", r"/4/state/_METADATA is not valid JSON"),
    "truncated_host_metadata": (lambda d: _truncate(os.path.join(d, "host", "metadata"), 50),
                                "bad-json", r"/4/host/metadata is not valid JSON"),
    "empty_step_folder": (_empty, "empty", r"the step folder .*/4 is empty"),
    "missing_host_item": (lambda d: shutil.rmtree(os.path.join(d, "host")), "no-host",
                          r"its item 'host' is missing"),
}


@pytest.fixture(scope="module")
def undamaged(corpus, tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4: (workdir, config, final params, loss)."""
  config = _config(corpus, **{"train.steps": 4, "train.checkpoint_every": 2})
  workdir = tmp_path_factory.mktemp("undamaged") / "run"
  _, params = _run(config, workdir)
  loss = metrics_lib.read_metrics(workdir)[-1]["loss"]
  return workdir, config, params, loss


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(
    undamaged, tmp_path, capsys, case):
  ref_dir, config, ref_params, ref_loss = undamaged
  damage, tag, said = DAMAGE[case]
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  damage(str(workdir / "checkpoints" / "4"))
  capsys.readouterr()
  summary, params = _run(config, workdir)
  log = capsys.readouterr().out
  assert summary["init"] == "resumed from step 2" and summary["step"] == 4
  assert re.search(r"checkpoint step 4 does not restore: (.*?)" + said, log), log
  aside = workdir / "checkpoints" / "damaged" / f"4-{tag}"
  assert aside.is_dir() and str(aside) in log  # kept aside, not deleted
  assert re.search(said, (workdir / "checkpoints" / "damaged" / f"4-{tag}.txt").read_text())
  if case != "empty_step_folder":
    assert os.listdir(aside)
  assert ckpt_lib.Checkpointer(str(workdir / "checkpoints")).all_steps() == [2, 4]
  # Steps 3 and 4 again from step 2: bit for bit the undamaged run's.
  assert metrics_lib.read_metrics(workdir)[-1]["loss"] == ref_loss
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)


def test_files_a_restore_does_not_read_cost_nothing(undamaged, tmp_path):
  """_CHECKPOINT_METADATA, state/_sharding and state/array_metadatas are not read back:
  without them the step still restores, and nothing is set aside."""
  ref_dir, config, ref_params, _ = undamaged
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  step = workdir / "checkpoints" / "4"
  os.remove(step / "_CHECKPOINT_METADATA")
  os.remove(step / "state" / "_sharding")
  shutil.rmtree(step / "state" / "array_metadatas")
  trainer = stages.make_trainer(config, str(workdir), devices=jax.devices()[:1])
  try:
    state, how, _ = trainer.initial_state()
  finally:
    trainer.close()
  assert how == "resumed from step 4" and not (workdir / "checkpoints" / "damaged").exists()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), ref_params)


def test_no_intact_checkpoint_stops_naming_every_step_and_moves_nothing(undamaged, tmp_path):
  ref_dir, config, _, _ = undamaged
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  for step in (2, 4):
    _truncate(str(workdir / "checkpoints" / str(step) / "host" / "metadata"), 50)
  with pytest.raises(ckpt_lib.RestoreError, match=r"does not start over: step 4: .*/4/host/"
                     r"metadata is not valid JSON .*; step 2: .*/2/host/metadata is not valid"):
    _train(config, workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_a_changed_model_sets_no_intact_checkpoint_aside(undamaged, tmp_path):
  """Every step failing alike is a changed config, not damage: nothing is moved."""
  ref_dir, config, _, _ = undamaged
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  wider = _config(config.data.corpus_dir, **{"train.steps": 4, "train.checkpoint_every": 2})
  wider.model.mlp_dim = 128
  with pytest.raises(Exception):
    _train(wider, workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


# ------------------------------------------------------------------ the final evaluation


def test_a_failing_final_evaluation_keeps_the_final_checkpoint(corpus, tmp_path, monkeypatch):
  config = _config(corpus, **{"train.steps": 6})  # checkpoints every 4: step 6 only at the end
  evaluate = trainer_lib.Trainer.evaluate

  def fails_at_the_end(self, params=None, domains=None):
    if int(jax.device_get(self.state.step)) == self.config.train.steps:
      raise FileNotFoundError("validation.jsonl")
    return evaluate(self, params, domains)

  monkeypatch.setattr(trainer_lib.Trainer, "evaluate", fails_at_the_end)
  with pytest.raises(FileNotFoundError, match="validation.jsonl"):
    _train(config, tmp_path)
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [4, 6]
  monkeypatch.undo()
  summary = _train(config, tmp_path)  # the rerun evaluates only
  assert summary["init"] == "resumed from step 6" and summary["steps_run"] == 0
  assert summary["eval"]


# ------------------------------------------------------------------ divergence


def test_a_good_step_is_one_whose_next_loss_came_before_the_first_suspect_step():
  good = divergence_lib.good_step
  assert good([4, 6, 7], first_bad=8) == 6  # a NaN loss at 8: the params of 7 made it
  assert good([6, 7], first_bad=9) == 7  # non-finite params after step 8 (loss 8 finite)
  assert good([7], first_bad=8) is None and good([], first_bad=3) is None
  config = tiny_config(**{"train.loss_spike_factor": 3.0})
  guard = divergence_lib.Guard(config.train)
  guard.check_window(2, 5.0, steps=2)  # the first window: nothing to compare with
  guard.check_window(4, 14.0, steps=2)  # below 3 x 5.0
  with pytest.raises(divergence_lib.Diverged) as spike:
    guard.check_window(6, 42.5, steps=2)  # above 3 x 14.0
  assert (spike.value.step, spike.value.first_bad) == (6, 5)
  assert "train.loss_spike_factor=3" in spike.value.reason and guard.reference == 14.0
  with pytest.raises(divergence_lib.Diverged) as nan:
    guard.check_step(7, float("nan"))
  assert (nan.value.first_bad, nan.value.reason) == (7, "loss is nan at step 7")
  with pytest.raises(divergence_lib.Diverged) as params:
    guard.check_step(8, 2.0, params_finite=False)
  assert params.value.first_bad == 9


def _exploding(corpus, **kw):
  """lr 1e3 without clipping: finite but exploding params, then NaN (about step 8)."""
  config = _config(corpus, **{"train.steps": 12, "train.checkpoint_every": 1,
                              "train.log_every": 1, **kw})
  config.optimizer.update(lr=1e3, warmup_steps=1, clip_norm=0.0)
  return config


def test_divergence_stop_names_a_step_that_resumes_without_nan(corpus, tmp_path, capsys):
  config = _exploding(corpus)
  with pytest.raises(FloatingPointError) as err:
    _train(config, tmp_path)
  msg = str(err.value)
  good = int(re.search(r"(?:newest|last) good checkpoint is step (\d+)", msg)[1])
  saved = _saved_params(config, tmp_path)
  assert all(_finite(p) for p in saved.values()), [s for s, p in saved.items() if not _finite(p)]
  assert max(saved) == good and "train.on_divergence='stop'" in msg, (sorted(saved), msg)
  # A rerun resumes from it; the loss of the step after it is finite (the same LR
  # diverges again later: the stop names a step after `good`, never its next loss).
  capsys.readouterr()
  with pytest.raises(FloatingPointError) as again:
    _train(config, tmp_path)
  assert f"resumed from step {good};" in capsys.readouterr().out
  found = int(re.search(r"(?:after|at) step (\d+)", str(again.value))[1])
  assert found > good and not re.search(rf"loss is \S+ at step {good + 1}\b", str(again.value))


def test_rollback_stops_after_max_rollbacks(corpus, tmp_path, capsys):
  config = _exploding(corpus, **{"train.on_divergence": "rollback", "train.max_rollbacks": 2})
  with pytest.raises(FloatingPointError, match=r"rolled back 2 times already \(train."
                     r"max_rollbacks=2\)\. The newest good checkpoint is step \d+"):
    _train(config, tmp_path)
  assert len(re.findall(r"rolled back to step \d+ \(\d of train.max_rollbacks=2\)",
                        capsys.readouterr().out)) == 2
  assert all(_finite(p) for p in _saved_params(config, tmp_path).values())


@pytest.mark.parametrize("poison", ["nan", "spike"])
def test_rollback_skips_the_offending_batches_and_finishes(corpus, tmp_path, monkeypatch, poison):
  """A poisoned batch (data step 5) wrecks the params: NaN, or x20 (a finite loss spike).
  The run rolls back to the newest good step and never trains on that batch again."""
  config = _config(corpus, **{"train.checkpoint_every": 2, "train.on_divergence": "rollback",
                              "train.loss_spike_factor": 3.0 if poison == "spike" else 0.0})
  train_step, seen = trainer_lib.Trainer._train_step, []  # pylint: disable=protected-access

  def poisoned(self, local):
    seen.append(self.pipeline.step - 1)  # the data step of this batch
    state, metrics = train_step(self, local)
    if seen[-1] == 5:
      scale = np.nan if poison == "nan" else 20.0
      state = state.replace(params=jax.tree.map(lambda x: x * scale, state.params))
    return state, metrics

  monkeypatch.setattr(trainer_lib.Trainer, "_train_step", poisoned)
  summary = _train(config, tmp_path)
  assert summary["step"] == 8 and len(summary["rollbacks"]) == 1, summary["rollbacks"]
  back = summary["rollbacks"][0]
  assert back["to"] == 4 and back["skipped_batches"][0] == 4 and seen.count(5) == 1
  assert ("loss spike" in back["reason"]) == (poison == "spike"), back
  assert summary["data"]["step"] == 8 + back["skipped_batches"][1] - 4
  assert seen == list(range(summary["data"]["step"]))  # each batch once, in order
  saved = _saved_params(config, tmp_path)
  assert sorted(saved) == [6, 8] and all(_finite(p) for p in saved.values())
