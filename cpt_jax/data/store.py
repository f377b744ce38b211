"""Cached packed-row store: one (domain, split) tokenised and packed once, in shards.

On disk: <cache_dir>/<domain>.<split>.<key>/ holding
  index.json           format version, content key, seq_len, rows per shard, build stats
  rows-SSSSS.bin       rows_Rx3xL int32, row-major: row r at byte r * 12 * L
  tokens-SSSSS.bin     row_tokens_R int32: non-padding tokens of each row
where key hashes the source fingerprint (files, sizes, mtimes), the vocabulary,
seq_len, reading options, rows per shard and FORMAT_VERSION (so a store of an
older format is never read: its key differs and it is rebuilt).

Writing streams: documents are tokenised in chunks, packed with
`packing.StreamPacker` whenever `buffer_tokens` tokens are pending, and the
finished rows appended to the current shard, so peak memory is set by the
buffer, not by the corpus. The rows equal `packing.pack_flat` of the whole
stream. A local store is written to a temporary folder and renamed into
place; a remote one (gs://, any etils.epath path) is written in place with
index.json last. Either way a reader, who opens a store only through its
index, never sees a partial one.

Reading is random access by global row index without loading a shard:
local shards are memory-mapped, remote ones read with a seek and one ranged
read per run of consecutive rows on an epath file handle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Iterator

from absl import logging
import numpy as np

from cpt_jax import paths
from cpt_jax.data import packing
from cpt_jax.data import sources as sources_lib
from cpt_jax.data import tasks as tasks_lib
from cpt_jax.data import vocab as vocab_lib

FORMAT_VERSION = 2
INDEX = "index.json"
SHARD_ROWS = 16384  # rows per shard (data.shard_rows)
BUFFER_TOKENS = 1 << 20  # tokens packed at once while building (data.build_buffer_tokens)
_ENCODE_CHUNK = 512  # documents tokenised per call
_PLANES = 3


is_remote = paths.is_remote  # gs://, s3://, ...: ranged reads, not memory maps


def _join(path: str, name: str) -> str:
  return str(paths.as_path(path, name)) if is_remote(path) else os.path.join(path, name)


def _open(path: str, mode: str):
  return paths.as_path(path).open(mode) if is_remote(path) else open(path, mode)


def _exists(path: str) -> bool:
  return paths.as_path(path).exists() if is_remote(path) else os.path.isfile(path)


class _Shard:
  """One shard's rows and row token counts: memory-mapped, or ranged reads."""

  def __init__(self, rows_path: str, tokens_path: str, rows: int, seq_len: int, mmap: bool):
    self.rows_path, self.tokens_path = rows_path, tokens_path
    self.rows, self.seq_len, self.mmap = rows, seq_len, mmap
    self._row_bytes = _PLANES * seq_len * 4
    self._maps: dict[str, np.ndarray] = {}
    self._files: dict[str, object] = {}
    self._lock = threading.Lock()

  def _map(self, path: str, shape) -> np.ndarray:
    m = self._maps.get(path)
    if m is None:
      m = self._maps[path] = (np.memmap(path, np.int32, "r", shape=shape) if self.rows
                              else np.zeros(shape, np.int32))
    return m

  def _ranged(self, path: str, idx: np.ndarray, item_bytes: int, shape) -> np.ndarray:
    """Items idx of a fixed-width file: one seek and read per run of neighbouring items."""
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    got = np.empty((idx.size,) + shape, np.int32)
    breaks = np.nonzero(np.diff(sorted_idx) > 1)[0] + 1  # repeats join their run
    with self._lock:
      f = self._files.get(path)
      if f is None:
        f = self._files[path] = _open(path, "rb")
      for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, idx.size]):
        f.seek(int(sorted_idx[lo]) * item_bytes)
        n = (sorted_idx[hi - 1] - sorted_idx[lo] + 1) * item_bytes
        buf = f.read(n)
        if len(buf) != n:
          raise IOError(f"{path}: short read at item {sorted_idx[lo]} ({len(buf)} of {n} bytes)")
        items = np.frombuffer(buf, np.int32).reshape((-1,) + shape)
        got[lo:hi] = items[sorted_idx[lo:hi] - sorted_idx[lo]]  # repeats read once
    out = np.empty_like(got)
    out[order] = got
    return out

  def close(self) -> None:
    """Closes the ranged-read handles (reopened by the next read)."""
    with self._lock:
      files, self._files = self._files, {}
    for f in files.values():
      f.close()

  def read(self, idx: np.ndarray, what: str) -> np.ndarray:
    """Rows (rows_Nx3xL) or token counts (N) of local rows idx, in idx's order."""
    if what == "rows":
      shape = (_PLANES, self.seq_len)
      if self.mmap:
        return self._map(self.rows_path, (self.rows,) + shape)[idx]
      return self._ranged(self.rows_path, idx, self._row_bytes, shape)
    if self.mmap:
      return self._map(self.tokens_path, (self.rows,))[idx]
    return self._ranged(self.tokens_path, idx, 4, ())


class PackedStore:
  """Random-access packed rows of one (domain, split) (or a row range of one)."""

  def __init__(self, path: str, mmap: bool | None = None):
    """mmap: memory-map the shards (default for local paths) or use ranged reads."""
    self.path = str(path)
    with _open(_join(self.path, INDEX), "r") as f:
      self.meta = json.load(f)
    if self.meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"{self.path}: store format {self.meta.get('format')} is not "
                       f"{FORMAT_VERSION}; delete it to rebuild")
    self.seq_len = int(self.meta["seq_len"])
    mmap = not is_remote(self.path) if mmap is None else mmap
    self._shards = [_Shard(_join(self.path, s["rows_file"]), _join(self.path, s["tokens_file"]),
                           int(s["rows"]), self.seq_len, mmap) for s in self.meta["shards"]]
    self._first_S = np.cumsum([0] + [s.rows for s in self._shards])  # global row of each shard
    self._lo, self._n = 0, int(self._first_S[-1])

  @property
  def num_rows(self) -> int:
    return self._n

  def _read(self, idx_B, what: str) -> np.ndarray:
    g_B = np.asarray(idx_B, np.int64).reshape(-1)
    if g_B.size and (g_B.min() < 0 or g_B.max() >= self._n):
      raise IndexError(f"{self.path}: row ids outside [0, {self._n})")
    g_B = g_B + self._lo
    if len(self._shards) == 1:
      return self._shards[0].read(g_B, what)
    shard_B = np.searchsorted(self._first_S, g_B, side="right") - 1
    tail = (_PLANES, self.seq_len) if what == "rows" else ()
    out = np.empty((g_B.size,) + tail, np.int32)
    for s in np.unique(shard_B):
      m = shard_B == s
      out[m] = self._shards[s].read(g_B[m] - self._first_S[s], what)
    return out

  def close(self) -> None:
    """Closes the open file handles of remote shards (a later read reopens them)."""
    for shard in self._shards:
      shard.close()

  def gather(self, idx_B: np.ndarray) -> np.ndarray:
    """Rows idx_B -> planes_3xBxL (int32, in memory); reads only those rows."""
    return self._read(idx_B, "rows").transpose(1, 0, 2)

  def row_tokens(self, idx_B: np.ndarray) -> np.ndarray:
    """Non-padding tokens of rows idx_B (int64 B)."""
    return self._read(idx_B, "tokens").astype(np.int64)

  @property
  def row_tokens_R(self) -> np.ndarray:
    """Every row's token count (reads the whole column: 4 bytes per row)."""
    return self.row_tokens(np.arange(self._n))

  @property
  def rows_3xRxL(self) -> np.ndarray:
    """Every row as planes (reads the whole store; small stores and tests only)."""
    return self.gather(np.arange(self._n))

  def slice(self, start: int, stop: int) -> "PackedStore":
    """A view of rows [start, stop) (no copy)."""
    if not 0 <= start <= stop <= self._n:
      raise IndexError(f"slice [{start}, {stop}) outside [0, {self._n})")
    view = object.__new__(PackedStore)
    view.__dict__.update(self.__dict__)
    view.meta = dict(self.meta, row_range=[self._lo + start, self._lo + stop])
    view._lo, view._n = self._lo + start, stop - start
    return view


# -- building ------------------------------------------------------------------


def cache_key(src: sources_lib.Source, vocab: vocab_lib.Vocab, seq_len: int,
              append_eos: bool, on_bad_line: str, max_docs: int,
              shard_rows: int = SHARD_ROWS) -> str:
  blob = json.dumps([FORMAT_VERSION, src.fingerprint(), src.domain, src.split, vocab.key,
                     seq_len, append_eos, on_bad_line, max_docs, shard_rows], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def store_name(src: sources_lib.Source, key: str) -> str:
  safe = re.sub(r"[^\w.\-]", "_", src.domain)
  return f"{safe}.{src.split}.{key}"


def text_documents(src: sources_lib.Source, vocab: vocab_lib.Vocab, append_eos: bool,
                   on_bad_line: str, max_docs: int, stats: sources_lib.ReadStats
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Tokenised documents of a text source, in order, as (flat_T, lengths_O) chunks."""
  chunk: list[str] = []

  def encode():
    flat_T, lengths_O = vocab.encode_batch(chunk)
    if append_eos:
      flat_T = np.insert(flat_T, np.cumsum(lengths_O), vocab.eos_id)
      lengths_O = lengths_O + 1
    chunk.clear()
    return flat_T, lengths_O

  for text in sources_lib.read_texts(src, on_bad_line, max_docs, stats):
    chunk.append(text)
    if len(chunk) >= _ENCODE_CHUNK:
      yield encode()
  if chunk:
    yield encode()


class ShardWriter:
  """Appends rows to shards of `shard_rows` rows under `out_dir`; `close` lists them."""

  def __init__(self, out_dir: str, shard_rows: int, seq_len: int):
    if shard_rows < 1:
      raise ValueError(f"data.shard_rows must be >= 1, got {shard_rows}")
    self.out_dir, self.shard_rows, self.seq_len = out_dir, int(shard_rows), int(seq_len)
    self.shards: list[dict] = []
    self._rows_f = self._tokens_f = None
    self._in_shard = 0

  def _next_shard(self) -> None:
    self._close_shard()
    i = len(self.shards)
    entry = {"rows": 0, "rows_file": f"rows-{i:05d}.bin", "tokens_file": f"tokens-{i:05d}.bin"}
    self.shards.append(entry)
    self._rows_f = _open(_join(self.out_dir, entry["rows_file"]), "wb")
    self._tokens_f = _open(_join(self.out_dir, entry["tokens_file"]), "wb")
    self._in_shard = 0

  def _close_shard(self) -> None:
    if self._rows_f is not None:
      self._rows_f.close()
      self._tokens_f.close()
      self.shards[-1]["rows"] = self._in_shard
      self._rows_f = self._tokens_f = None

  def write(self, rows_Rx3xL: np.ndarray) -> None:
    tokens_R = (rows_Rx3xL[:, packing.SEGMENT_IDS] > 0).sum(axis=1).astype(np.int32)
    i = 0
    while i < rows_Rx3xL.shape[0]:
      if self._rows_f is None or self._in_shard == self.shard_rows:
        self._next_shard()
      n = min(self.shard_rows - self._in_shard, rows_Rx3xL.shape[0] - i)
      self._rows_f.write(np.ascontiguousarray(rows_Rx3xL[i:i + n], np.int32).tobytes())
      self._tokens_f.write(tokens_R[i:i + n].tobytes())
      self._in_shard += n
      i += n

  def close(self) -> list[dict]:
    self._close_shard()
    return self.shards


def write_store(documents, out_dir: str, seq_len: int, *, shard_rows: int = SHARD_ROWS,
                buffer_tokens: int = BUFFER_TOKENS) -> dict:
  """Packs the (flat_T, lengths_O) chunks of `documents` into shards under `out_dir`.

  Holds at most about `buffer_tokens` tokens (plus one chunk) in memory.
  Returns the index fields: seq_len, shards, rows, tokens.
  """
  if buffer_tokens < 1:
    raise ValueError(f"data.build_buffer_tokens must be >= 1, got {buffer_tokens}")
  packer = packing.StreamPacker(seq_len)
  writer = ShardWriter(out_dir, shard_rows, seq_len)
  tokens = rows = 0
  for flat_T, lengths_O in documents:
    packer.add(flat_T, lengths_O)
    tokens += int(flat_T.size)
    if packer.pending_tokens >= buffer_tokens:
      out = packer.take()
      writer.write(out)
      rows += out.shape[0]
  out = packer.take(final=True)
  writer.write(out)
  rows += out.shape[0]
  return {"format": FORMAT_VERSION, "seq_len": int(seq_len), "dtype": "int32",
          "shards": writer.close(), "rows": rows, "tokens": tokens}


def build_into(src: sources_lib.Source, vocab: vocab_lib.Vocab, seq_len: int, out_dir: str,
               key: str, *, append_eos: bool = True, on_bad_line: str = "error",
               max_docs: int = 0, shard_rows: int = SHARD_ROWS,
               buffer_tokens: int = BUFFER_TOKENS, documents=None) -> dict:
  """Writes the store of `src` into `out_dir` (index last); returns its index.

  documents: (flat_T, lengths_O) chunks to pack instead of reading `src` as text
  (a seqio Task's tokenised targets); `read_stats` then fills the document counts.
  """
  t0 = time.time()
  stats = sources_lib.ReadStats()
  if documents is None and src.kind == tasks_lib.SEQIO:
    documents = tasks_lib.seqio_documents(src, max_docs)
  if documents is None:
    documents = text_documents(src, vocab, append_eos, on_bad_line, max_docs, stats)
  else:
    documents = _counted(documents, stats)
  index = write_store(documents, out_dir, seq_len, shard_rows=shard_rows,
                      buffer_tokens=buffer_tokens)
  where = ", ".join(src.files) or (f"tfds:{src.tfds_name}/{src.tfds_split}"
                                    if src.kind == "tfds" else f"{src.kind}:{src.domain}/{src.split}")
  if stats.docs == 0:
    extra = f" ({stats.skipped} bad lines skipped; first: {stats.first_skip})" if stats.skipped else ""
    raise sources_lib.DataError(
        f"domain {src.domain!r}: split {src.split!r} is empty: no documents in {where}{extra}")
  index.update({
      "key": key, "domain": src.domain, "split": src.split, "source": where,
      "vocab": vocab.key, "docs": stats.docs, "skipped_lines": stats.skipped,
      "first_skip": stats.first_skip,
  })  # no timings: the same input gives a byte-identical store, whoever builds it
  with _open(_join(out_dir, INDEX), "w") as f:
    json.dump(index, f)
  if stats.skipped:
    logging.warning("domain %s/%s: skipped %d bad lines (first: %s)", src.domain, src.split,
                    stats.skipped, stats.first_skip)
  logging.info("packed %s/%s: %d docs, %d tokens, %d rows in %d shards in %.2fs", src.domain,
               src.split, stats.docs, index["tokens"], index["rows"], len(index["shards"]),
               time.time() - t0)
  return index


def _counted(documents, stats: sources_lib.ReadStats):
  for flat_T, lengths_O in documents:
    stats.docs += int(np.asarray(lengths_O).size)
    yield flat_T, lengths_O


def publish(src: sources_lib.Source, cache_dir: str, key: str, build) -> str:
  """Runs `build(out_dir)` so that readers never see a partial store; returns the final path.

  Local: into a temporary folder renamed into place (a racing builder's copy wins
  and ours is dropped). Remote: into the final folder, whose index.json `build`
  writes last.
  """
  final = _join(cache_dir, store_name(src, key))
  if is_remote(cache_dir):
    paths.as_path(final).mkdir(parents=True, exist_ok=True)
    build(final)
    return final
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{store_name(src, key)}.", dir=cache_dir)
  try:
    build(tmp)
    try:
      os.rename(tmp, final)
    except OSError:  # another process won the race; use its store
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def find(src: sources_lib.Source, cache_dir: str, key: str) -> str | None:
  """The published store of (src, key) under cache_dir, or None."""
  final = _join(cache_dir, store_name(src, key))
  return final if _exists(_join(final, INDEX)) else None


def build_or_load(src: sources_lib.Source, vocab: vocab_lib.Vocab, seq_len: int,
                  cache_dir: str, *, append_eos: bool = True, on_bad_line: str = "error",
                  max_docs: int = 0, shard_rows: int = SHARD_ROWS,
                  buffer_tokens: int = BUFFER_TOKENS, documents=None) -> PackedStore:
  """Returns the cached store of `src`, building it (atomically) when absent."""
  key = cache_key(src, vocab, seq_len, append_eos, on_bad_line, max_docs, shard_rows)
  found = find(src, cache_dir, key)
  if found:
    return PackedStore(found)
  final = publish(src, cache_dir, key, lambda out: build_into(
      src, vocab, seq_len, out, key, append_eos=append_eos, on_bad_line=on_bad_line,
      max_docs=max_docs, shard_rows=shard_rows, buffer_tokens=buffer_tokens,
      documents=documents))
  return PackedStore(final)


@dataclasses.dataclass(frozen=True)
class BuildJob:
  """Everything one store's build needs (picklable: what a worker process receives)."""
  src: sources_lib.Source
  vocab: str  # data.vocab
  seq_len: int
  cache_dir: str
  append_eos: bool = True
  on_bad_line: str = "error"
  max_docs: int = 0
  shard_rows: int = SHARD_ROWS
  buffer_tokens: int = BUFFER_TOKENS

  def key(self, vocab: vocab_lib.Vocab | None = None) -> str:
    vocab = vocab or vocab_lib.make_vocab(self.vocab)
    return cache_key(self.src, vocab, self.seq_len, self.append_eos, self.on_bad_line,
                     self.max_docs, self.shard_rows)

  def run(self, vocab: vocab_lib.Vocab | None = None, documents=None) -> PackedStore:
    """The store, built (atomically) unless already published."""
    return build_or_load(self.src, vocab or vocab_lib.make_vocab(self.vocab), self.seq_len,
                         self.cache_dir, append_eos=self.append_eos,
                         on_bad_line=self.on_bad_line, max_docs=self.max_docs,
                         shard_rows=self.shard_rows, buffer_tokens=self.buffer_tokens,
                         documents=documents)


def wait_for(src: sources_lib.Source, cache_dir: str, key: str, timeout_s: float,
             poll_s: float = 1.0) -> PackedStore:
  """The store another process is building, once published; TimeoutError naming it."""
  deadline = time.time() + timeout_s
  while True:
    found = find(src, cache_dir, key)
    if found:
      return PackedStore(found)
    if time.time() >= deadline:
      raise TimeoutError(
          f"store {store_name(src, key)} did not appear in {cache_dir} within {timeout_s:.0f}s "
          f"(data.store_wait_seconds); process 0 builds it into a cache_dir every process "
          f"must see (data.cache_dir), or set data.build_on_every_process")
    time.sleep(poll_s)
