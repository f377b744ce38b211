"""Mixer and pipeline: determinism, resume, weight changes, prefetch, roles, scale."""

import json
import logging
import os
import threading

import numpy as np
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax.schema import data as config_lib
from cpt_jax.data import mixer as mixer_lib
from cpt_jax.data import pipeline as pipeline_lib

L = 32


def write_corpus(root, sizes, seed=0, val_docs=3):
  """Domains d<i> with `sizes[i]` train docs of varied length (and val_docs)."""
  rng = np.random.default_rng(seed)
  names = []
  for i, n in enumerate(sizes):
    name = f"d{i:03d}"
    os.makedirs(root / name)
    for split, k in (("train", n), ("validation", val_docs)):
      with open(root / name / f"{split}.jsonl", "w") as f:
        for j in range(k):
          body = rng.integers(97, 123, size=int(rng.integers(1, 3 * L))).astype(np.uint8)
          text = f"{name}/{split}/{j} " + body.tobytes().decode()
          f.write(json.dumps({"id": f"{name}-{j}", "text": text}) + "\n")
    names.append(name)
  return names


def make_cfg(tmp_path, **kw):
  cfg = config_lib.default_data_config()
  cfg.corpus_dir = str(tmp_path / "corpus")
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.seq_len = L
  cfg.seed = 7
  for k, v in kw.items():
    cfg[k] = v
  return cfg


@pytest.fixture
def corpus(tmp_path):
  write_corpus(tmp_path / "corpus", [40, 25, 10, 30])
  return tmp_path


def run(cfg, steps, batch=8, changes=None, **kw):
  """Batches of `steps` steps; changes = {step: weights} applied before that step."""
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=batch, **kw)
  out = []
  try:
    for s in range(steps):
      if changes and s in changes:
        p.set_weights(changes[s])
      assert p.step == s
      out.append(p.next_batch())
  finally:
    p.close()
  return out


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in batch_lib.FIELDS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_honour_contract_and_roles(corpus):
  cfg = make_cfg(corpus, new="d000", replay="d001", distill="d002", eval="d003")
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  try:
    assert p.domains == ["d000", "d001", "d002", "d003"]
    assert p.roles == ["new", "replay", "distill", "eval"]
    assert p.num_domains == 4 and p.weights[3] == 0
    seen = set()
    for _ in range(30):
      b = p.next_batch()
      batch_lib.check_batch(b, L)
      for k, dt in batch_lib.FIELD_DTYPES.items():
        assert b[k].dtype == dt
      np.testing.assert_array_equal(b["roles"], p.role_ids[b["domain_ids"]])
      seen |= set(b["domain_ids"].tolist())
      # distill rows come from the validation split, the others from train.
      for i, d in enumerate(b["domain_ids"]):
        split = "validation" if d == 2 else "train"
        rows = p._store(p.domains[d], split).rows_3xRxL[0]  # pylint: disable=protected-access
        assert (rows == b["targets"][i]).all(axis=1).any()
    assert seen == {0, 1, 2}  # eval never trains
  finally:
    p.close()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_deterministic(corpus, prefetch):
  cfg = make_cfg(corpus, replay="*", prefetch=prefetch)
  a = run(cfg, 20)
  b = run(make_cfg(corpus, replay="*", prefetch=0), 20)
  assert_same(a, b)
  c = run(make_cfg(corpus, replay="*", seed=8), 20)
  assert any((x["targets"] != y["targets"]).any() for x, y in zip(a, c))


def test_weight_change_during_prefetch_equals_sync(corpus):
  changes = {5: {"d000": 0.0, "d002": 5.0}, 9: np.array([1.0, 1.0, 0.0, 3.0]),
             10: np.array([1.0, 1.0, 0.0, 3.0])}
  sync = run(make_cfg(corpus, replay="*", prefetch=0), 16, changes=changes)
  cfg = make_cfg(corpus, replay="*", prefetch=6)
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  got = []
  try:
    for s in range(16):
      if s in changes:
        # Let the producer run ahead with the old weights first.
        for _ in range(200):
          with p._cv:  # pylint: disable=protected-access
            if len(p._queue) >= 6:  # pylint: disable=protected-access
              break
          threading.Event().wait(0.002)
        p.set_weights(changes[s])
      got.append(p.next_batch())
  finally:
    p.close()
  assert_same(sync, got)
  for s in range(5, 9):  # d000 at weight 0 from step 5 on
    assert 0 not in got[s]["domain_ids"]
  for s in range(9, 16):
    assert 2 not in got[s]["domain_ids"]


def test_random_weight_changes_with_prefetch_equal_sync(corpus):
  rng = np.random.default_rng(1)
  changes = {int(s): rng.random(4) * (rng.random(4) > 0.3) + np.eye(4)[s % 4]
             for s in rng.choice(60, 25, replace=False)}
  sync = run(make_cfg(corpus, replay="*", prefetch=0), 60, changes=changes)
  pre = run(make_cfg(corpus, replay="*", prefetch=5), 60, changes=changes)
  assert_same(sync, pre)


def test_resume_is_bit_exact(corpus):
  cfg = make_cfg(corpus, replay="*", prefetch=2)
  full = run(cfg, 30, changes={4: {"d001": 3.0}})
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  first = []
  for s in range(12):
    if s == 4:
      p.set_weights({"d001": 3.0})
    first.append(p.next_batch())
  state = json.loads(json.dumps(p.state()))  # through a checkpoint
  p.close()
  q = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  q.restore(state)
  assert q.step == 12
  np.testing.assert_array_equal(q.weights, p.weights)
  rest = [q.next_batch() for _ in range(18)]
  q.close()
  assert_same(full, first + rest)


def test_restore_rejects_other_seed(corpus):
  p = pipeline_lib.make_pipeline(make_cfg(corpus, replay="*", prefetch=0), global_batch_size=8)
  state = p.state()
  q = pipeline_lib.make_pipeline(make_cfg(corpus, replay="*", prefetch=0, seed=1),
                                 global_batch_size=8)
  with pytest.raises(ValueError, match="data.seed"):
    q.restore(state)


def test_zero_weight_never_sampled():
  w = np.array([0.0, 1e-9, 0.0, 5.0, 0.0, 1.0, 0.0])
  counts = np.zeros(7, np.int64)
  for s in range(3000):
    dom = mixer_lib.assign_slots(3, s, w, 16)
    counts += np.bincount(dom, minlength=7)
  assert counts[[0, 2, 4, 6]].sum() == 0
  assert counts.sum() == 3000 * 16
  # Systematic sampling: each step gives floor or ceil of B*p, so the totals
  # are within one row per step of the expectation; tiny weights are still
  # honoured in expectation (1e-9 * 48000 ~ 0 rows).
  expected = 3000 * 16 * w / w.sum()
  assert np.all(np.abs(counts - expected) <= 0.02 * expected + 1)


def test_small_weight_honoured_in_expectation():
  w = np.array([1.0, 0.01])
  n = sum(int((mixer_lib.assign_slots(0, s, w, 8) == 1).sum()) for s in range(5000))
  assert abs(n - 5000 * 8 * 0.01 / 1.01) < 60  # ~396 expected


def test_epoch_rollover_reshuffles_and_logs(corpus, caplog):
  caplog.set_level(logging.INFO)
  cfg = make_cfg(corpus, new="d002", prefetch=0)  # one small domain
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=4)
  n = p.mixer.rows_C[p.domains.index("d002")]
  seqs = [p.next_batch()["targets"] for _ in range(3 * n // 4 + 2)]
  assert "domain d002 finished epoch 2" in caplog.text
  rows = np.concatenate(seqs)
  e0, e1 = rows[:n], rows[n:2 * n]
  key = lambda r: r.tobytes()
  # Each epoch is a permutation of all rows (no row dropped or repeated) ...
  assert sorted(map(key, e0)) == sorted(map(key, e1))
  assert len(set(map(key, e0))) == n
  # ... in a different order.
  assert [key(r) for r in e0] != [key(r) for r in e1]
  st = p.stats()
  assert st["epochs_per_domain"]["d002"] >= 2.0
  p.close()


def test_multi_host_slices_concatenate_to_global(corpus):
  cfg = make_cfg(corpus, replay="*", prefetch=0)
  one = run(cfg, 10, batch=8)
  halves = [run(cfg, 10, batch=8, process_index=i, process_count=2) for i in range(2)]
  for s in range(10):
    for k in batch_lib.FIELDS:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][s][k], halves[1][s][k]]), one[s][k])
  with pytest.raises(ValueError, match="process_count"):
    pipeline_lib.make_pipeline(cfg, global_batch_size=7, process_count=2)


def test_stats_count_tokens_per_domain_and_role(corpus):
  cfg = make_cfg(corpus, new="d000", replay="d001", distill="d002", eval="d003", prefetch=0)
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  tokens = np.zeros(4, np.int64)
  for _ in range(15):
    b = p.next_batch()
    np.add.at(tokens, b["domain_ids"], b["loss_weights"].sum(1).astype(np.int64))
  st = p.stats()
  json.dumps(st)
  assert st["step"] == 15
  assert [st["tokens_per_domain"][d] for d in p.domains] == tokens.tolist()
  assert st["tokens_per_role"] == {"new": tokens[0], "replay": tokens[1],
                                   "distill": tokens[2], "eval": 0}
  assert sum(st["rows_per_domain"].values()) == 15 * 8
  p.close()


def test_eval_batches_fixed_order_and_padding(corpus):
  cfg = make_cfg(corpus, new="d000", eval="d003", prefetch=0)
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  a = list(p.eval_batches("d003", 4))
  b = list(p.eval_batches("d003", 4))
  assert_same(a, b)
  store = p._eval_store("d003")  # pylint: disable=protected-access
  n = store.num_rows
  assert n < p._store("d003", "validation").num_rows  # eval_holdout keeps only the tail
  assert len(a) == -(-n // 4)
  lw = np.concatenate([x["loss_weights"] for x in a])
  assert (lw[:n].sum(1) > 0).all() and (lw[n:] == 0).all()
  assert all((x["roles"] == batch_lib.EVAL).all() and (x["domain_ids"] == 1).all() for x in a)
  assert len(list(p.eval_batches("d003", 4, max_rows=2))) == 1
  # Two processes' eval slices concatenate to the global eval batch.
  q = pipeline_lib.make_pipeline(cfg, global_batch_size=8, process_index=1, process_count=2)
  c = list(q.eval_batches("d003", 4))
  np.testing.assert_array_equal(c[0]["targets"], a[0]["targets"][2:])
  p.close()
  q.close()


def test_distill_rows_never_overlap_eval_rows(corpus):
  cfg = make_cfg(corpus, new="d000", distill="d003", prefetch=0)
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  d = p.domains.index("d003")
  train_rows = set()
  for _ in range(20):
    b = p.next_batch()
    train_rows |= {r.tobytes() for r, dom in zip(b["targets"], b["domain_ids"]) if dom == d}
  eval_rows = {r.tobytes() for x in p.eval_batches("d003", 4) for r, w in
               zip(x["targets"], x["loss_weights"]) if w.sum() > 0}
  assert train_rows and eval_rows and not train_rows & eval_rows
  p.close()


def test_prefetch_error_surfaces(corpus):
  cfg = make_cfg(corpus, replay="*", prefetch=2)
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  p.mixer.produce = lambda *a: (_ for _ in ()).throw(OSError("disk gone"))
  p.set_weights({"d000": 9.0})
  with pytest.raises(RuntimeError, match="prefetch"):
    p.next_batch()
  p.close()


def test_error_of_a_discarded_prefetch_generation_is_ignored(corpus):
  """A batch made with weights that were replaced before it was used never counts."""
  cfg = make_cfg(corpus, replay="*", prefetch=2)
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  produce = p.mixer.produce
  started, replaced = threading.Event(), threading.Event()

  def failing_for_old_weights(state, w):
    if w[0] == 9.0:  # the weights about to be replaced
      started.set()
      replaced.wait(10)
      raise OSError("made with stale weights")
    return produce(state, w)

  p.mixer.produce = failing_for_old_weights
  try:
    p.set_weights({"d000": 9.0})
    assert started.wait(10)
    p.set_weights({"d000": 1.0})  # discards the generation that is failing
    replaced.set()
    batch = p.next_batch()
    ref = pipeline_lib.make_pipeline(make_cfg(corpus, replay="*", prefetch=0),
                                     global_batch_size=8)
    ref.set_weights({"d000": 1.0})
    assert_same([ref.next_batch()], [batch])
    ref.close()
  finally:
    p.close()


def test_two_hundred_tiny_domains(tmp_path):
  names = write_corpus(tmp_path / "corpus", [3] * 200, val_docs=2)
  cfg = make_cfg(tmp_path, new="d000", replay="*", distill="d199", eval="d198",
                 weights="d000=10,d19[0-7]=0,*=1", prefetch=2)
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=64)
  assert p.domains == names and p.num_domains == 200
  seen = np.zeros(200, np.int64)
  for _ in range(60):
    b = p.next_batch()
    np.add.at(seen, b["domain_ids"], 1)
  assert seen[190:199].sum() == 0  # zero weights and the eval domain
  assert (seen[:190] > 0).all() and seen[199] > 0
  assert seen[0] > 5 * seen[1:190].mean()
  w = p.weights
  w[5] = 0.0
  p.set_weights(w)
  st = json.loads(json.dumps(p.state()))
  assert len(st["consumed"]) == 200
  assert len(p.stats()["tokens_per_domain"]) == 200
  p.close()
