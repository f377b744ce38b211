"""Per-domain buffer quotas from measured forgetting (replay.online_quota)."""

import jax
import numpy as np
import pytest

from cpt_jax import data as data_lib
from cpt_jax import stages
from cpt_jax.replay import quota
from tests.helpers import crash_then_resume, tiny_config, write_corpus


def test_allocate_by_hand():
  # Equal pools, forgetting 0.3 / 0.1, strength 0.5: shares 0.5 x 0.5 + 0.5 x 0.75 = 0.625
  # and 0.375 of 10 rows: 6.25 / 3.75 -> 6 + 3, the spare row to the larger remainder (b).
  assert quota.allocate(10, {"a": 100, "b": 100}, {"a": 0.3, "b": 0.1}, 0.5) == \
      {"a": 6, "b": 4}
  # b does not forget, strength 1: a would take all 10, b keeps its one-row floor.
  assert quota.allocate(10, {"a": 100, "b": 300}, {"a": 0.3, "b": 0.0}, 1.0) == \
      {"a": 9, "b": 1}
  # Nothing forgets (negative counts as 0): by pool size, 2.5 / 7.5 -> 3 / 7 (tie: first).
  assert quota.allocate(10, {"a": 100, "b": 300}, {"a": -0.3, "b": -0.1}, 1.0) == \
      {"a": 3, "b": 7}
  # 30 vs 30 -> 5 / 5, but only 3 rows of a can be had: b takes the other 7.
  assert quota.allocate(10, {"a": 100, "b": 300}, {"a": 0.3, "b": 0.1}, 1.0,
                        cap={"a": 3, "b": 300}) == {"a": 3, "b": 7}


def _config(corpus, tmp_path, online_quota, init=""):
  c = tiny_config()
  c.data.update(corpus_dir=str(corpus), cache_dir=str(tmp_path / "cache"))
  c.sharding.mesh_shape = (1, 1, 1)
  c.train.update(steps=8, log_every=2, checkpoint_every=4, eval_batches=1, init_checkpoint=init)
  c.replay.update(strategy="online", fraction=0.5, selection_fraction=0.5, online_every=2,
                  online_pool=40, online_swap=0.5, online_quota=online_quota)
  return c


def train_forgetting_m(tmp_path):
  """(corpus, M's checkpoints): M trained on beta and gamma only, so that CPT on alpha
  makes them forget."""
  corpus = write_corpus(tmp_path / "corpus", docs=60)
  m = tiny_config()
  m.data.update(corpus_dir=str(corpus), cache_dir=str(tmp_path / "cache"), new="beta,gamma",
                replay="")
  m.sharding.mesh_shape = (1, 1, 1)
  m.train.update(steps=40, log_every=20, checkpoint_every=40, eval_batches=1)
  stages.train(m, str(tmp_path / "m"), devices=jax.devices()[:1])
  return corpus, str(tmp_path / "m" / "checkpoints")


def test_online_quota_moves_rows_to_forgetting_domains_and_resumes(tmp_path):
  corpus, ckpt = train_forgetting_m(tmp_path)
  c = _config(corpus, tmp_path, 1.0, ckpt)
  c.optimizer.lr = 1e-1  # a large step on alpha: M's rows of beta and gamma get worse
  c.replay.fraction = 0.25
  ref = stages.train(c, str(tmp_path / "ref"), devices=jax.devices()[:1])
  online = ref["selection"]["online"]
  assert online["refreshes"] == 3 and set(online["forgetting"]) == {"beta", "gamma"}
  f = online["forgetting"]
  assert max(f.values()) > 0  # CPT on alpha raised the loss on M's rows
  rows = {d: len(v) for d, v in online["ref_loss"].items()}  # buffer rows per domain
  # The selection started at the pool shares; the domain that forgets more (per row,
  # weighted by its pool) ends with more than that.
  _, start = check_buffer_moved(c, ref, tmp_path, rows, f, "online",
                                lambda k, pools: quota.allocate(k, pools, {}, 1.0))
  assert rows != start


def check_buffer_moved(c, ref, tmp_path, rows, signal, key, start_fn):
  """Checks a stage whose buffer (`rows` per domain of beta, gamma) was re-split by
  `signal` per domain: the total is kept; the domain with the largest pool-weighted
  positive signal ends with more rows than start_fn(k, pools); the replay weights follow
  the buffer sizes; a crash at step 4 and a resume reproduce selection[key] and the eval.
  Returns (that domain, the start split)."""
  k = ref["selection"]["buffer_rows"]
  assert sum(rows.values()) == k  # the total is kept
  with data_lib.make_pipeline(c.data, global_batch_size=8) as pipe:
    pools = {d: pipe.full_training_store(d).num_rows for d in ("beta", "gamma")}
  more = max(pools, key=lambda d: pools[d] * max(signal[d], 0.0))
  start = start_fn(k, pools)
  assert rows[more] > start[more]
  # Each buffer row is replayed equally often: the replay weights follow the buffer sizes.
  w = ref["data"]["weights"]
  assert w["beta"] / w["gamma"] == pytest.approx(rows["beta"] / rows["gamma"], rel=1e-9)
  out = crash_then_resume(c, tmp_path / "run", 6)
  assert out["init"] == "resumed from step 4"
  assert out["selection"][key] == ref["selection"][key]
  np.testing.assert_allclose(out["eval"]["alpha"]["loss"], ref["eval"]["alpha"]["loss"],
                             rtol=1e-5)
  return more, start
