"""Sharded streaming stores: rows equal the in-memory packer, bounded buffers, reads."""

import json
import os

import numpy as np
import pytest

from cpt_jax.data import packing
from cpt_jax.data import sources as sources_lib
from cpt_jax.data import store as store_lib
from cpt_jax.data import vocab as vocab_lib


def _docs(rng, n, L):
  lens = rng.choice([0, 1, L - 1, L, L + 1, 2 * L, 3 * L + 5], size=n)
  lens = np.where(rng.random(n) < 0.5, rng.integers(0, 4 * L + 1, n), lens)
  return [rng.integers(3, 300, size=int(k)).astype(np.int32) for k in lens]


def _chunks(docs, per):
  for i in range(0, len(docs), per):
    part = docs[i:i + per]
    yield (np.concatenate(part) if part else np.zeros(0, np.int32),
           np.array([d.size for d in part], np.int64))


@pytest.mark.parametrize("seed", range(4))
def test_stream_packer_equals_whole_stream_packing(seed):
  rng = np.random.default_rng(seed)
  L = int(rng.integers(2, 40))
  docs = _docs(rng, 60, L)
  want = packing.pack_flat(np.concatenate(docs), [d.size for d in docs], L)
  for buffer_tokens in (1, 7, L, 5 * L, 10 ** 6):
    packer, got = packing.StreamPacker(L), []
    for flat, lens in _chunks(docs, int(rng.integers(1, 9))):
      packer.add(flat, lens)
      if packer.pending_tokens >= buffer_tokens:
        got.append(packer.take())
    got.append(packer.take(final=True))
    np.testing.assert_array_equal(np.concatenate(got).transpose(1, 0, 2), want)


def test_sharded_store_rows_equal_in_memory_builder(tmp_path):
  rng = np.random.default_rng(0)
  L = 16
  docs = _docs(rng, 200, L)
  want = packing.pack_flat(np.concatenate(docs), [d.size for d in docs], L)
  out = str(tmp_path / "s")
  os.makedirs(out)
  index = store_lib.write_store(_chunks(docs, 5), out, L, shard_rows=7, buffer_tokens=50)
  index.update(key="k", docs=len(docs), skipped_lines=0)
  with open(os.path.join(out, store_lib.INDEX), "w") as f:
    json.dump(index, f)
  assert [s["rows"] for s in index["shards"]][:-1] == [7] * (len(index["shards"]) - 1)
  assert index["rows"] == want.shape[1] and index["tokens"] == sum(d.size for d in docs)
  for mmap in (True, False):  # memory-mapped and ranged reads
    st = store_lib.PackedStore(out, mmap=mmap)
    assert st.num_rows == want.shape[1]
    np.testing.assert_array_equal(st.rows_3xRxL, want)
    idx = rng.permutation(st.num_rows)[:40]
    idx[:3] = idx[0]  # repeats
    np.testing.assert_array_equal(st.gather(idx), want[:, idx])
    np.testing.assert_array_equal(st.row_tokens(idx), (want[1][idx] > 0).sum(1))
    view = st.slice(5, 30)
    np.testing.assert_array_equal(view.gather([0, 24, 3]), want[:, [5, 29, 8]])
    np.testing.assert_array_equal(view.slice(2, 4).gather([1]), want[:, [8]])
    with pytest.raises(IndexError):
      view.gather([25])


def _jsonl(path, texts):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for i, t in enumerate(texts):
      f.write(json.dumps({"id": str(i), "text": t}) + "\n")


def _old_in_ram_rows(src, vocab, L):
  """The in-memory builder of format 1: every document tokenised, then one pack."""
  texts = list(sources_lib.read_texts(src))
  flat, lens = vocab.encode_batch(texts)
  flat = np.insert(flat, np.cumsum(lens), vocab.eos_id)
  return packing.pack_flat(flat, lens + 1, L)


def test_text_store_equals_old_builder_for_any_buffer_and_shard_size(tmp_path):
  rng = np.random.default_rng(1)
  texts = ["".join(chr(int(c)) for c in rng.integers(32, 0x3000, size=int(n)))
           for n in rng.integers(1, 200, size=300)]
  path = str(tmp_path / "c" / "dom" / "train.jsonl")
  _jsonl(path, texts)
  src = sources_lib.Source("jsonl", "dom", "train", (path,))
  vocab = vocab_lib.Vocab("byte")
  want = _old_in_ram_rows(src, vocab, 32)
  paths = set()
  for shard_rows, buffer_tokens in ((store_lib.SHARD_ROWS, store_lib.BUFFER_TOKENS), (10, 100),
                                    (10, 3)):
    st = store_lib.build_or_load(src, vocab, 32, str(tmp_path / "cache"), shard_rows=shard_rows,
                                 buffer_tokens=buffer_tokens)
    paths.add(st.path)
    np.testing.assert_array_equal(st.rows_3xRxL, want)
    assert st.meta["docs"] == len(texts) and st.meta["format"] == store_lib.FORMAT_VERSION
  # shard size is in the key, the buffer is not (it changes nothing on disk)
  assert len(paths) == 2


def test_format_version_is_in_the_key_and_publish_is_atomic(tmp_path, monkeypatch):
  path = str(tmp_path / "c" / "dom" / "train.jsonl")
  _jsonl(path, ["hello", "world"])
  src = sources_lib.Source("jsonl", "dom", "train", (path,))
  vocab = vocab_lib.Vocab("byte")
  cache = str(tmp_path / "cache")
  key = store_lib.cache_key(src, vocab, 8, True, "error", 0)
  monkeypatch.setattr(store_lib, "FORMAT_VERSION", store_lib.FORMAT_VERSION - 1)
  assert store_lib.cache_key(src, vocab, 8, True, "error", 0) != key  # old caches rebuild
  monkeypatch.undo()

  def boom(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(store_lib, "write_store", boom)
  with pytest.raises(RuntimeError):
    store_lib.build_or_load(src, vocab, 8, cache)
  assert os.listdir(cache) == []  # nothing partial left behind, nothing published
  monkeypatch.undo()
  st = store_lib.build_or_load(src, vocab, 8, cache)
  assert os.listdir(cache) == [os.path.basename(st.path)]
  assert store_lib.find(src, cache, st.meta["key"]) == st.path


def test_memory_is_bounded_by_the_buffer(tmp_path, monkeypatch):
  """The packer never holds more than the buffer plus one chunk of documents."""
  seen = []
  real = packing.pack_flat

  def spy(flat_T, lengths_O, seq_len):
    seen.append(flat_T.size)
    return real(flat_T, lengths_O, seq_len)

  monkeypatch.setattr(packing, "pack_flat", spy)
  docs = [np.full(10, 5, np.int32)] * 2000  # 20,000 tokens
  out = str(tmp_path / "s")
  os.makedirs(out)
  index = store_lib.write_store(_chunks(docs, 10), out, 16, shard_rows=64, buffer_tokens=500)
  assert index["tokens"] == 20000 and max(seen) < 500 + 100 + 16
  assert len(index["shards"]) > 1


def test_remote_path_is_written_in_place_index_last_and_read_by_ranges(tmp_path, monkeypatch):
  """A bucket path goes through etils.epath: shards in place, index.json last, ranged reads."""
  monkeypatch.setattr(store_lib, "is_remote", lambda p: True)  # the code path of gs:// paths
  path = str(tmp_path / "c" / "dom" / "train.jsonl")
  _jsonl(path, [f"document {i} " * (i % 7 + 1) for i in range(200)])
  src = sources_lib.Source("jsonl", "dom", "train", (path,))
  vocab = vocab_lib.Vocab("byte")
  cache = str(tmp_path / "bucket")
  key = store_lib.cache_key(src, vocab, 16, True, "error", 0, 8)
  real = store_lib.ShardWriter.close

  def fail_after_shards(self):
    real(self)
    raise RuntimeError("preempted")

  monkeypatch.setattr(store_lib.ShardWriter, "close", fail_after_shards)
  with pytest.raises(RuntimeError):
    store_lib.build_or_load(src, vocab, 16, cache, shard_rows=8)
  folder = os.path.join(cache, store_lib.store_name(src, key))
  assert any(f.startswith("rows-") for f in os.listdir(folder))  # shards written in place
  assert store_lib.find(src, cache, key) is None  # but no index: not published
  monkeypatch.setattr(store_lib.ShardWriter, "close", real)
  st = store_lib.build_or_load(src, vocab, 16, cache, shard_rows=8)
  assert st.path == folder and not st._shards[0].mmap  # pylint: disable=protected-access
  want = _old_in_ram_rows(src, vocab, 16)
  np.testing.assert_array_equal(st.gather(np.arange(st.num_rows)[::-1]), want[:, ::-1])
  shards = st._shards  # pylint: disable=protected-access
  assert any(s._files for s in shards)  # pylint: disable=protected-access
  st.close()  # what Pipeline.close does for every store
  assert not any(s._files for s in shards)  # pylint: disable=protected-access
  np.testing.assert_array_equal(st.gather(np.arange(3)), want[:, :3])  # reopened on demand
