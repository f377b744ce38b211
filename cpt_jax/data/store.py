"""Cached packed-row store: one (domain, split) tokenised and packed once.

On disk: <cache_dir>/<domain>.<split>.<key>/{rows.npy, row_tokens.npy, meta.json}
where key hashes the source fingerprint (files, sizes, mtimes), the vocabulary,
seq_len and reading options. Writes go to a temporary folder renamed into
place, so readers never see a partial store. Rows are memory-mapped, so any
row is random-access and a batch is a gather.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time

from absl import logging
import numpy as np

from cpt_jax.data import packing
from cpt_jax.data import sources as sources_lib
from cpt_jax.data import vocab as vocab_lib

FORMAT_VERSION = 1
_ENCODE_CHUNK = 512  # documents tokenised per call


class PackedStore:
  """Random-access packed rows of one (domain, split)."""

  def __init__(self, path: str):
    self.path = path
    self.rows_3xRxL = np.load(os.path.join(path, "rows.npy"), mmap_mode="r")
    self.row_tokens_R = np.load(os.path.join(path, "row_tokens.npy"))
    with open(os.path.join(path, "meta.json")) as f:
      self.meta = json.load(f)

  @property
  def num_rows(self) -> int:
    return int(self.rows_3xRxL.shape[1])

  def gather(self, idx_B: np.ndarray) -> np.ndarray:
    """Rows idx_B -> planes_3xBxL (int32, in memory)."""
    return self.rows_3xRxL[:, np.asarray(idx_B, np.int64)]

  def slice(self, start: int, stop: int) -> "PackedStore":
    """A view of rows [start, stop) (no copy)."""
    view = object.__new__(PackedStore)
    view.path, view.meta = self.path, dict(self.meta, row_range=[start, stop])
    view.rows_3xRxL = self.rows_3xRxL[:, start:stop]
    view.row_tokens_R = self.row_tokens_R[start:stop]
    return view


def cache_key(src: sources_lib.Source, vocab: vocab_lib.Vocab, seq_len: int,
              append_eos: bool, on_bad_line: str, max_docs: int) -> str:
  blob = json.dumps([FORMAT_VERSION, src.fingerprint(), vocab.key, seq_len, append_eos,
                     on_bad_line, max_docs], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def build_or_load(src: sources_lib.Source, vocab: vocab_lib.Vocab, seq_len: int,
                  cache_dir: str, *, append_eos: bool = True, on_bad_line: str = "error",
                  max_docs: int = 0) -> PackedStore:
  """Returns the cached store of `src`, building it (atomically) when absent."""
  key = cache_key(src, vocab, seq_len, append_eos, on_bad_line, max_docs)
  safe = re.sub(r"[^\w.\-]", "_", src.domain)
  final = os.path.join(cache_dir, f"{safe}.{src.split}.{key}")
  if os.path.isfile(os.path.join(final, "meta.json")):
    return PackedStore(final)
  os.makedirs(cache_dir, exist_ok=True)
  t0 = time.time()
  stats = sources_lib.ReadStats()
  flats, lens = [], []
  chunk = []

  def flush():
    flat_T, lengths_O = vocab.encode_batch(chunk)
    if append_eos:
      flat_T = np.insert(flat_T, np.cumsum(lengths_O), vocab.eos_id)
      lengths_O = lengths_O + 1
    flats.append(flat_T)
    lens.append(lengths_O)
    chunk.clear()

  for text in sources_lib.read_texts(src, on_bad_line, max_docs, stats):
    chunk.append(text)
    if len(chunk) >= _ENCODE_CHUNK:
      flush()
  if chunk:
    flush()
  where = ", ".join(src.files) or f"tfds:{src.tfds_name}/{src.tfds_split}"
  if stats.docs == 0:
    extra = f" ({stats.skipped} bad lines skipped; first: {stats.first_skip})" if stats.skipped else ""
    raise sources_lib.DataError(
        f"domain {src.domain!r}: split {src.split!r} is empty: no documents in {where}{extra}")
  flat_T = np.concatenate(flats)
  lengths_O = np.concatenate(lens)
  planes = packing.pack_flat(flat_T, lengths_O, seq_len)
  row_tokens_R = (planes[packing.SEGMENT_IDS] > 0).sum(axis=1).astype(np.int64)
  meta = {
      "domain": src.domain, "split": src.split, "source": where, "seq_len": seq_len,
      "vocab": vocab.key, "docs": stats.docs, "skipped_lines": stats.skipped,
      "first_skip": stats.first_skip, "tokens": int(flat_T.size), "rows": int(planes.shape[1]),
      "build_seconds": round(time.time() - t0, 3),
  }
  tmp = tempfile.mkdtemp(prefix=f".tmp-{safe}.", dir=cache_dir)
  try:
    np.save(os.path.join(tmp, "rows.npy"), planes)
    np.save(os.path.join(tmp, "row_tokens.npy"), row_tokens_R)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f)
    try:
      os.rename(tmp, final)
    except OSError:  # another process won the race; use its store
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if stats.skipped:
    logging.warning("domain %s/%s: skipped %d bad lines (first: %s)", src.domain, src.split,
                    stats.skipped, stats.first_skip)
  logging.info("packed %s/%s: %d docs, %d tokens, %d rows in %.2fs", src.domain, src.split,
               stats.docs, flat_T.size, planes.shape[1], time.time() - t0)
  return PackedStore(final)
