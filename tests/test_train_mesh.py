"""The whole trainer on a 2x2x2 CPU mesh equals the 1-device run.

One CPT stage with every sharded path at once: a teacher (distill rows and
replay KD), online replay scoring, gradient accumulation, a crash after a
checkpoint and the resume; plus MFU against the mesh's peak.
"""

import jax
import numpy as np
import pytest

from cpt_jax import stages
from cpt_jax.train import metrics as metrics_lib
from cpt_jax.train import trainer as trainer_lib
from tests.helpers import tiny_config, write_corpus


class _Crash(Exception):
  pass


def _crash_at_6(step, record, pipeline):
  if step == 6:
    raise _Crash()


@pytest.fixture(scope="module")
def start(tmp_path_factory):
  """A corpus and a 1-device pretrained starting model M (the teacher)."""
  root = tmp_path_factory.mktemp("mesh")
  corpus = write_corpus(root / "corpus", domains=("alpha", "beta", "gamma", "delta"), docs=60)
  c = _config(corpus, root, mesh=(1, 1, 1))
  c.data.update(new="beta,gamma,delta", replay="", distill="")
  c.replay.strategy = ""
  c.data.distill = ""  # no teacher: its rows would train nothing (validate_config refuses)
  c.objective.update(lambda_kd=0.0, replay_kd=0.0)
  c.train.update(steps=2, checkpoint_every=2, grad_accum_steps=1, init_checkpoint="")
  stages.train(c, str(root / "m"), devices=jax.devices()[:1])
  return corpus, root


def _config(corpus, root, mesh):
  c = tiny_config()
  c.data.update(corpus_dir=str(corpus), cache_dir=str(root / "cache"), new="alpha",
                replay="beta,gamma", distill="delta")
  c.sharding.mesh_shape = mesh
  c.train.update(steps=8, log_every=2, checkpoint_every=4, eval_batches=1, grad_accum_steps=2,
                 init_checkpoint=str(root / "m"))
  c.objective.update(lambda_kd=1.0, replay_kd=0.5, kd_temperature=2.0)
  c.replay.update(strategy="online", fraction=0.5, selection_fraction=0.5, online_every=2,
                  online_pool=40, online_swap=0.5)
  return c


def _records(workdir):
  return {r["step"]: r for r in metrics_lib.read_metrics(workdir)}


def test_2x2x2_mesh_with_teacher_online_replay_and_resume_equals_one_device(start, tmp_path):
  corpus, root = start
  one = stages.train(_config(corpus, root, (1, 1, 1)), str(tmp_path / "one"),
                          devices=jax.devices()[:1])
  c8 = _config(corpus, root, (2, 2, 2))
  with pytest.raises(_Crash):  # after the step-4 checkpoint, before the step-6 refresh
    stages.train(c8, str(tmp_path / "mesh"), on_metrics=_crash_at_6)
  mesh = stages.train(c8, str(tmp_path / "mesh"))
  assert mesh["init"] == "resumed from step 4" and mesh["num_devices"] == 8
  assert one["selection"]["online"]["refreshes"] == 3  # steps 2, 4, 6: online scoring ran
  o1, o8 = one["selection"]["online"], mesh["selection"]["online"]
  assert {k: v for k, v in o8.items() if k != "ref_loss"} == \
      {k: v for k, v in o1.items() if k != "ref_loss"}  # the same swaps and buffer
  for d, losses in o1["ref_loss"].items():  # M's scores: a float32 ulp apart across meshes
    np.testing.assert_allclose(o8["ref_loss"][d], losses, rtol=1e-6)
  # Teacher rows as run: on the mesh each of the 4 row blocks (data x fsdp) runs its
  # microbatch's bucket (the fullest block's), so 2 microbatches x 4 blocks a bucket.
  assert one["teacher_rows"] > 0 and mesh["teacher_rows"] >= one["teacher_rows"]
  # The plan counts that padding before the first step (replay/planner.py teacher_padding).
  planned = lambda r: r["selection"]["planned"]["tflops"]["teacher"]
  assert planned(mesh) > planned(one) > 0
  assert mesh["teacher_rows"] % (2 * 4) == 0
  r1, r8 = _records(tmp_path / "one"), _records(tmp_path / "mesh")
  assert sorted(r1) == sorted(r8) == [2, 4, 6, 8]
  for s in r1:
    for key in ("loss", "ce_term", "kd_term", "replay_kd_term"):
      assert r8[s][key] == pytest.approx(r1[s][key], abs=1e-5), (s, key)
  for d, ev in one["eval"].items():
    assert mesh["eval"][d]["loss"] == pytest.approx(ev["loss"], abs=1e-5), d


def test_mfu_divides_by_the_peak_of_every_device(start, tmp_path):
  """MFU = tokens/s x FLOPs per token / (peak per device x 8 devices)."""
  corpus, root = start
  c = _config(corpus, root, (-1, 1, 1))
  c.replay.strategy = ""
  c.data.distill = ""  # no teacher: its rows would train nothing (validate_config refuses)
  c.objective.update(lambda_kd=0.0, replay_kd=0.0)
  c.train.update(steps=2, grad_accum_steps=1, init_checkpoint="")
  summary = stages.train(c, str(tmp_path / "run"))
  rec = metrics_lib.read_metrics(tmp_path / "run")[-1]
  # FLOPs per token of the tiny model, by hand: matmul weights per layer q 32x32,
  # k, v 32x16 (2 KV heads of 8), o 32x32, SwiGLU 3 x 32x64; 2 layers; head 32x259.
  matmul_weights = 2 * (1024 + 512 + 512 + 1024 + 3 * 2048) + 32 * 259
  attention = 4 * 2 * 32 * 4 * 8  # 4 x layers x L x heads x head_dim
  flops_per_token = 3 * (2 * matmul_weights + attention)
  assert flops_per_token == 184896
  assert summary["num_devices"] == 8 and summary["peak_flops"] == 1e11
  assert rec["mfu"] == pytest.approx(rec["tokens_per_sec"] * flops_per_token / 8e11, rel=1e-9)
