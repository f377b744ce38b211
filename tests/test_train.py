"""End-to-end trainer tests: metrics, checkpoints, resume, warm start, NaN stop."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from cpt_jax import stages
from cpt_jax.train import checkpoint as ckpt_lib
from cpt_jax.train import metrics as metrics_lib
from cpt_jax.train import trainer as trainer_lib
from tests.helpers import one_device_config as _config
from tests.helpers import train_one_device as _train
from tests.helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


class _Crash(Exception):
  pass


def test_metrics_checkpoints_and_resume_match_uninterrupted(corpus, tmp_path):
  config = _config(corpus)
  _train(config, tmp_path / "a")
  ref = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(tmp_path / "a")}
  assert sorted(ref) == [2, 4, 6, 8]
  rec = metrics_lib.read_metrics(tmp_path / "a")[-1]
  for key in ("loss", "learning_rate", "tokens_per_sec", "mfu", "domain_loss", "weights"):
    assert key in rec, key
  assert set(rec["domain_loss"]) <= {"alpha", "beta", "gamma"} and rec["domain_loss"]
  assert os.listdir(tmp_path / "a" / "tensorboard")
  assert ckpt_lib.Checkpointer(str(tmp_path / "a" / "checkpoints")).all_steps() == [4, 8]

  def crash_after_checkpoint(step, record, pipeline):
    if step == 6:
      raise _Crash()

  with pytest.raises(_Crash):
    _train(config, tmp_path / "b", on_metrics=crash_after_checkpoint)
  assert ckpt_lib.Checkpointer(str(tmp_path / "b" / "checkpoints")).all_steps() == [4]
  summary = _train(config, tmp_path / "b")
  assert summary["init"] == "resumed from step 4"
  got = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(tmp_path / "b")}
  assert got[6] == pytest.approx(ref[6], abs=1e-6) and got[8] == pytest.approx(ref[8], abs=1e-6)


def test_half_written_checkpoint_is_ignored(corpus, tmp_path):
  config = _config(corpus, **{"train.steps": 4})
  _train(config, tmp_path)
  ckpt_dir = tmp_path / "checkpoints"
  # A save that died half-way: Orbax only renames the temporary folder when complete.
  partial = ckpt_dir / "8.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 100)
  assert ckpt_lib.Checkpointer(str(ckpt_dir)).latest_step() == 4
  config.train.steps = 6
  assert _train(config, tmp_path)["init"] == "resumed from step 4"


def test_warm_start_from_another_run(corpus, tmp_path):
  config = _config(corpus, **{"train.steps": 4})
  base = stages.make_trainer(config, str(tmp_path / "base"), devices=jax.devices()[:1])
  base.run()
  base.close()
  cpt = _config(corpus, **{"train.steps": 2, "train.init_checkpoint": str(tmp_path / "base")})
  cpt.optimizer.update(schedule="rewarm_cosine", init_lr=1e-4)
  warm = stages.make_trainer(cpt, str(tmp_path / "cpt"), devices=jax.devices()[:1])
  state, how, _ = warm.initial_state()
  warm.close()
  assert how.startswith("warm start") and int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(base.state.params))
  # The optimizer starts fresh: Adam moments are zero.
  assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(
      jax.device_get(state.opt_state)) if np.ndim(x) > 0)
  with pytest.raises(FileNotFoundError, match="init_checkpoint"):
    bad = _config(corpus, **{"train.init_checkpoint": str(tmp_path / "missing")})
    _train(bad, tmp_path / "bad")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
  config = _config(corpus, **{"train.steps": 12})
  config.optimizer.update(lr=1e12, warmup_steps=1, clip_norm=0.0)  # diverges quickly
  with pytest.raises(FloatingPointError, match="loss is"):
    _train(config, tmp_path)
  steps = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).all_steps()
  losses = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(tmp_path)}
  for s in steps:
    assert np.isfinite(losses[s]), (s, losses)


def test_init_from_hf_folder(corpus, tmp_path):
  pytest.importorskip("safetensors")
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from cpt_jax.model import hf  # pylint: disable=g-import-not-at-top
  from cpt_jax.model.transformer import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top
  config = _config(corpus, **{"train.steps": 1})
  model_cfg = ModelConfig.from_config(config.model)
  params = nn.unbox(Transformer(model_cfg).init(jax.random.key(7), np.zeros((1, 8), np.int32))
                    ["params"])
  hf.save_hf(params, model_cfg, str(tmp_path / "hf_model"))
  config.model.update(d_model=16, num_layers=1)  # overwritten from config.json
  config.train.init_from_hf = str(tmp_path / "hf_model")
  trainer = stages.make_trainer(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  state, how, _ = trainer.initial_state()
  trainer.close()
  assert "Hugging Face" in how and trainer.config.model.d_model == 32
  params = jax.tree.map(np.array, params)
  params["embed"]["embedding"][259:] = 0  # vocab padding is not part of the HF tensors
  params["lm_head"]["kernel"][:, 259:] = 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params)


def test_hard_budget_stops_the_stage_and_a_rerun_trains_no_further(corpus, tmp_path):
  from cpt_jax.model.transformer import flops_per_token  # pylint: disable=g-import-not-at-top
  from cpt_jax.train import budget as budget_lib  # pylint: disable=g-import-not-at-top
  config = _config(corpus)  # 8 steps, metrics every 2, checkpoints every 4
  trainer = stages.make_trainer(config, str(tmp_path / "probe"), devices=jax.devices()[:1])
  per_step = (config.train.global_batch_size * config.data.seq_len
              * flops_per_token(trainer.ctx.model_cfg, config.data.seq_len) / 1e12)
  trainer.close()
  # 3.5 steps' TFLOPs: at step 2 the next window (2 steps) would pass the cap.
  config.replay.max_tflops = 3.5 * per_step
  summary = _train(config, tmp_path / "run")
  assert summary["step"] == 2 and summary["budget"]["stopped_at"] == 2
  assert "replay.max_tflops" in summary["budget"]["reason"]
  assert summary["budget"]["tflops_used"] == pytest.approx(2 * per_step)
  assert summary["train_tokens"] == 2 * config.train.global_batch_size * config.data.seq_len
  assert summary["eval"]  # evaluated like a finished stage
  assert ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == [2]
  again = _train(config, tmp_path / "run")  # the stop is in the checkpoint: no more steps
  assert again["step"] == 2 and again["steps_run"] == 0
  assert max(r["step"] for r in metrics_lib.read_metrics(tmp_path / "run")) == 2
  config.replay.max_tflops = 0.0  # the cap lifted: the stage trains on to its end
  assert _train(config, tmp_path / "run")["step"] == 8

  # Seconds: the pace of the last window decides; usage adds up over restarts.
  b = budget_lib.StageBudget(max_seconds=100.0)
  b.start_window(budget_lib.Usage(step=0, seconds=10.0, tflops=0.0))
  assert b.check(budget_lib.Usage(step=10, seconds=50.0, tflops=0.0), next_steps=10) == ""
  why = b.check(budget_lib.Usage(step=20, seconds=85.0, tflops=0.0), next_steps=10)
  assert why.startswith("replay.max_seconds=100") and "~35.0 s more" in why
  b.stop(20, why)
  b2 = budget_lib.StageBudget(max_seconds=100.0)
  b2.load_state_dict(b.state_dict(seconds_used=85.0))
  assert (b2.seconds_before, b2.stopped_at, b2.reason) == (85.0, 20, why)
  raised = budget_lib.StageBudget(max_seconds=200.0)  # a raised cap lets the stage go on
  raised.load_state_dict(b.state_dict(seconds_used=85.0))
  assert (raised.seconds_before, raised.stopped_at) == (85.0, None)


def test_log_window_means_a_term_over_the_steps_that_computed_it():
  """kd_term exists only on steps that ran the teacher: its mean is over those."""
  w = metrics_lib.Window(1)  # pylint: disable=protected-access
  zero = {"domain_ce_sum": np.zeros(1), "domain_tokens": np.ones(1),
          "role_ce_sum": np.zeros(4), "role_tokens": np.ones(4)}
  w.add({**zero, "loss": 3.0, "kd_term": 2.0, "teacher_rows": 4})
  w.add({**zero, "loss": 1.0, "teacher_rows": 0})  # a step without teacher rows
  w.add({**zero, "loss": 2.0, "kd_term": 4.0, "teacher_rows": 4})
  out = w.summary(["a"])
  assert out["loss"] == pytest.approx(2.0) and out["kd_term"] == pytest.approx(3.0)
  assert "teacher_rows" not in out


@pytest.mark.parametrize("key, overrides", [
    ("replay.strategy", {"replay.strategy": "random"}),
    ("train.profile_steps", {"train.profile_steps": "1:2"}),
    ("decomposition.eval_without_tau", {"decomposition.mode": "lora"})])
def test_a_loop_without_the_features_refuses_a_config_that_asks_for_one(corpus, tmp_path,
                                                                        key, overrides):
  """The bare loop (no hooks_fn) has no replay selection, controller, profiler or
  sigma-only evaluation: a config that sets one fails before the first step instead of
  silently training without it (the last two were dropped without a word before)."""
  config = _config(corpus, **{"train.steps": 2, **overrides})
  bare = trainer_lib.Trainer(config, str(tmp_path / "bare"), devices=jax.devices()[:1])
  try:
    with pytest.raises(ValueError, match=rf"\['{key}'\].*features.make_hooks"):
      bare.run()
    assert not (tmp_path / "bare" / "metrics.jsonl").exists() or \
        not (tmp_path / "bare" / "metrics.jsonl").read_text()
  finally:
    bare.close()
  if key == "replay.strategy":
    summary = _train(config, tmp_path / "with")  # stages.train: the features' hooks
    assert summary["selection"]["strategy"] == "random" and summary["step"] == 2
