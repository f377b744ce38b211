"""Vectorised packer equals the reference packer; the packed-row store and its cache."""

import json
import os

import numpy as np
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax.data import packing
from cpt_jax.data import sources as sources_lib
from cpt_jax.data import store as store_lib
from cpt_jax.data import vocab as vocab_lib


def assert_batches_equal(a, b):
  assert set(a) == set(b)
  for k in batch_lib.FIELDS:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("seed", range(8))
def test_matches_reference_random(seed):
  rng = np.random.default_rng(seed)
  for _ in range(25):
    L = int(rng.integers(1, 48))
    lens = rng.choice([0, 1, max(L - 1, 1), L, L + 1, 2 * L, 3 * L + 5], size=int(rng.integers(0, 30)))
    lens = np.where(rng.random(lens.size) < 0.5, rng.integers(0, 4 * L + 1, lens.size), lens)
    docs = [rng.integers(1, 300, size=int(n)).astype(np.int32) for n in lens]
    assert_batches_equal(batch_lib.pack_documents(docs, L, 5, batch_lib.REPLAY),
                         packing.pack_documents(docs, L, 5, batch_lib.REPLAY))


@pytest.mark.parametrize("lens,L", [([], 4), ([0, 0], 4), ([4, 4, 4], 4), ([9], 4),
                                    ([1] * 10, 3), ([3, 2, 2, 1, 4, 1], 4)])
def test_matches_reference_edge_cases(lens, L):
  docs = [np.arange(1, n + 1, dtype=np.int32) * 7 for n in lens]
  assert_batches_equal(batch_lib.pack_documents(docs, L), packing.pack_documents(docs, L))


def test_long_document_split_not_dropped():
  doc = np.arange(1, 1001, dtype=np.int32)
  out = packing.pack_documents([doc], 64)
  np.testing.assert_array_equal(out["targets"][out["segment_ids"] > 0], doc)
  assert out["targets"].shape == (16, 64)
  assert (out["positions"][:, 0] == 0).all() and (out["inputs"][:, 0] == 0).all()


def test_large_pack_is_fast():
  rng = np.random.default_rng(0)
  lens = rng.integers(1, 2000, size=5000)
  flat = rng.integers(1, 250, size=int(lens.sum())).astype(np.int32)
  planes = packing.pack_flat(flat, lens, 256)  # ~5M tokens; well under a second
  seg = planes[packing.SEGMENT_IDS]
  np.testing.assert_array_equal(planes[packing.TARGETS][seg > 0], flat)


def _jsonl(path, texts):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for i, t in enumerate(texts):
      f.write(json.dumps({"id": str(i), "text": t}) + "\n")


def test_store_rows_equal_reference_packing_and_cache(tmp_path):
  texts = ["hello world", "é" * 50, "short", "x" * 3]
  path = str(tmp_path / "c" / "dom" / "train.jsonl")
  _jsonl(path, texts)
  src = sources_lib.Source("jsonl", "dom", "train", (path,))
  vocab = vocab_lib.Vocab("byte")
  cache = str(tmp_path / "cache")
  st = store_lib.build_or_load(src, vocab, 16, cache)
  docs = [np.frombuffer(t.encode(), np.uint8).astype(np.int32) + 3 for t in texts]
  docs = [np.append(d, 1) for d in docs]  # EOS
  ref = batch_lib.pack_documents(docs, 16)
  got = packing.rows_to_batch(st.gather(np.arange(st.num_rows)), ref["domain_ids"], ref["roles"])
  assert_batches_equal(ref, got)
  np.testing.assert_array_equal(st.row_tokens_R, ref["loss_weights"].sum(1))
  assert st.meta["docs"] == 4 and st.meta["tokens"] == sum(map(len, docs))
  # Cached: same folder, no temp folders left behind.
  assert store_lib.build_or_load(src, vocab, 16, cache).path == st.path
  assert [d for d in os.listdir(cache) if d.startswith(".tmp")] == []
  # A changed source file or seq_len gives a new store.
  _jsonl(path, texts + ["more text here"])
  src2 = sources_lib.Source("jsonl", "dom", "train", (path,))
  assert store_lib.build_or_load(src2, vocab, 16, cache).path != st.path
  assert store_lib.build_or_load(src2, vocab, 8, cache).meta["seq_len"] == 8
