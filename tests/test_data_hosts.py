"""Each process reads only the rows of its slice of every global batch (and of evaluation)."""

import numpy as np

from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.data import store as store_lib
from tests import helpers


def test_a_process_reads_only_its_rows(tmp_path, monkeypatch):
  corpus = helpers.write_corpus(tmp_path / "corpus", docs=60)
  cfg = helpers.tiny_config().data
  cfg.update(corpus_dir=str(corpus), cache_dir=str(tmp_path / "cache"), seq_len=16,
             shard_rows=5, replay="beta,gamma")
  one = pipeline_lib.make_pipeline(cfg, global_batch_size=8)  # builds the stores
  plans = []
  state = one.mixer.initial_state()
  for _ in range(6):
    plans.append(one.mixer.plan(state, one.weights))
    _, state = one.mixer.produce(state, one.weights)
  one.close()

  read = []  # (store path, row) of every row read from a store
  real = store_lib.PackedStore.gather

  def spy(self, idx_B):
    read.extend((self.path, int(self._lo + i)) for i in np.asarray(idx_B).reshape(-1))  # pylint: disable=protected-access
    return real(self, idx_B)

  monkeypatch.setattr(store_lib.PackedStore, "gather", spy)
  for host in range(2):
    read.clear()
    p = pipeline_lib.make_pipeline(cfg, global_batch_size=8, process_index=host,
                                   process_count=2)
    for _ in range(6):
      p.next_batch()
    want = []
    for dom_B, row_B in plans:
      for d, r in zip(dom_B[4 * host:4 * host + 4], row_B[4 * host:4 * host + 4]):
        want.append((p.mixer.stores[d].path, int(r)))
    assert sorted(read) == sorted(want)  # its 4 rows of each batch of 8, no other
    read.clear()
    batches = list(p.eval_batches("alpha", batch_size=4))
    n = p._eval_store("alpha").num_rows  # pylint: disable=protected-access
    lo = p._eval_store("alpha")._lo  # pylint: disable=protected-access
    mine = [lo + i for i in range(n) if (i % 4) // 2 == host]
    assert sorted(r for _, r in read) == mine and len(batches) == -(-n // 4)
    p.close()
