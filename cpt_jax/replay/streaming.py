"""Bounded-memory selectors fed scores batch by batch.

Every selector sees candidates as (keys, values) chunks and holds O(k) (or
O(sample)) of them, never the whole pool: a pool larger than RAM is scored
and selected in one streaming pass. `held` is the number of entries a selector
holds now and `peak_held` the most it ever held (the tests check both).

A key is a (domain index, row index) pair packed in one int64: see `pack_key`.
"""

from __future__ import annotations

import heapq

import numpy as np

_ROW_BITS = 40


def pack_key(domain_N: np.ndarray, row_N: np.ndarray) -> np.ndarray:
  """(domain, row) -> one int64 id (rows < 2**40)."""
  return (np.asarray(domain_N, np.int64) << _ROW_BITS) | np.asarray(row_N, np.int64)


def unpack_key(key_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  key_N = np.asarray(key_N, np.int64)
  return key_N >> _ROW_BITS, key_N & ((1 << _ROW_BITS) - 1)


class TopK:
  """The k largest scores seen (a min-heap; ties broken by key)."""

  def __init__(self, k: int):
    self.k = int(k)
    self._heap: list[tuple[float, int]] = []
    self.peak_held = 0
    self.seen = 0

  @property
  def held(self) -> int:
    return len(self._heap)

  def add(self, key_N: np.ndarray, score_N: np.ndarray) -> None:
    for key, s in zip(np.asarray(key_N).tolist(), np.asarray(score_N, np.float64).tolist()):
      self.seen += 1
      if not np.isfinite(s) or self.k <= 0:
        continue
      item = (s, -key)
      if len(self._heap) < self.k:
        heapq.heappush(self._heap, item)
      elif item > self._heap[0]:
        heapq.heapreplace(self._heap, item)
    self.peak_held = max(self.peak_held, len(self._heap))

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """(keys, scores), best first."""
    items = sorted(self._heap, reverse=True)
    return (np.array([-k for _, k in items], np.int64),
            np.array([s for s, _ in items], np.float64))


class Reservoir:
  """A uniform sample of k of the items seen (Algorithm R, seeded)."""

  def __init__(self, k: int, seed: int):
    self.k = int(k)
    self._rng = np.random.default_rng(seed)
    self.keys = np.zeros((0,), np.int64)
    self.scores = np.zeros((0,), np.float64)
    self.seen = 0
    self.peak_held = 0

  @property
  def held(self) -> int:
    return int(self.keys.size)

  def add(self, key_N: np.ndarray, score_N: np.ndarray) -> None:
    key_N = np.asarray(key_N, np.int64)
    score_N = np.asarray(score_N, np.float64)
    room = max(self.k - self.keys.size, 0)
    if room:
      self.keys = np.concatenate([self.keys, key_N[:room]])
      self.scores = np.concatenate([self.scores, score_N[:room]])
      self.seen += min(room, key_N.size)
      key_N, score_N = key_N[room:], score_N[room:]
    for key, s in zip(key_N.tolist(), score_N.tolist()):
      self.seen += 1
      j = int(self._rng.integers(0, self.seen))
      if j < self.k:
        self.keys[j], self.scores[j] = key, s
    self.peak_held = max(self.peak_held, self.held)

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    return self.keys.copy(), self.scores.copy()


class QuantileBand:
  """Keeps a uniform sample of k items whose score lies in a quantile band.

  Two phases with bounded memory: the first `sketch` items only fill a buffer
  (their scores estimate the band's thresholds); from then on every item,
  buffered ones first, goes through the band filter into a reservoir of k.
  """

  def __init__(self, k: int, low: float, high: float, sketch: int, seed: int):
    if not 0.0 <= low < high <= 1.0:
      raise ValueError(f"replay.band_low={low} / band_high={high}: need 0 <= low < high <= 1")
    self.low, self.high, self.sketch = float(low), float(high), max(int(sketch), 1)
    self._buf_keys: list[np.ndarray] = []
    self._buf_scores: list[np.ndarray] = []
    self._buffered = 0
    self.thresholds: tuple[float, float] | None = None
    self._res = Reservoir(k, seed)
    self.peak_held = 0
    self.seen = 0

  @property
  def held(self) -> int:
    return self._buffered + self._res.held

  def add(self, key_N: np.ndarray, score_N: np.ndarray) -> None:
    key_N, score_N = np.asarray(key_N, np.int64), np.asarray(score_N, np.float64)
    self.seen += key_N.size
    if self.thresholds is None:
      take = min(self.sketch - self._buffered, key_N.size)
      self._buf_keys.append(key_N[:take])
      self._buf_scores.append(score_N[:take])
      self._buffered += take
      self.peak_held = max(self.peak_held, self.held)
      key_N, score_N = key_N[take:], score_N[take:]
      if self._buffered < self.sketch:
        return
      self._fix_thresholds()
    self._filter(key_N, score_N)

  def _fix_thresholds(self) -> None:
    s = np.concatenate(self._buf_scores) if self._buf_scores else np.zeros((0,))
    s_fin = s[np.isfinite(s)]
    if s_fin.size == 0:
      self.thresholds = (np.inf, -np.inf)
    else:
      self.thresholds = (float(np.quantile(s_fin, self.low)),
                         float(np.quantile(s_fin, self.high)))
    keys = np.concatenate(self._buf_keys) if self._buf_keys else np.zeros((0,), np.int64)
    self._buf_keys, self._buf_scores, self._buffered = [], [], 0
    self._filter(keys, s)

  def _filter(self, key_N, score_N) -> None:
    lo, hi = self.thresholds
    m = (score_N >= lo) & (score_N <= hi)
    self._res.add(key_N[m], score_N[m])
    self.peak_held = max(self.peak_held, self.held)

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    if self.thresholds is None:
      self._fix_thresholds()
    keys, scores = self._res.result()
    order = np.argsort(-scores, kind="stable")
    return keys[order], scores[order]


def greedy_k_center(x_NxD: np.ndarray, k: int, first: int = 0) -> np.ndarray:
  """Indices of k points chosen by farthest-point traversal (2-approx k-center)."""
  n = x_NxD.shape[0]
  k = min(int(k), n)
  if k <= 0:
    return np.zeros((0,), np.int64)
  chosen = [int(first) % n]
  d_N = np.sum((x_NxD - x_NxD[chosen[0]]) ** 2, axis=1)
  for _ in range(k - 1):
    j = int(np.argmax(d_N))
    if d_N[j] <= 0:
      break  # every remaining point duplicates a chosen one
    chosen.append(j)
    d_N = np.minimum(d_N, np.sum((x_NxD - x_NxD[j]) ** 2, axis=1))
  return np.asarray(chosen, np.int64)


class KCenterCoreset:
  """Streaming greedy k-center: a composable coreset of `factor * k` points.

  Each chunk is merged with the current coreset and reduced back to at most
  factor*k points by farthest-point traversal; `result` runs the traversal on
  the coreset to pick k. Memory: (factor*k + chunk) embeddings.
  """

  def __init__(self, k: int, factor: int = 4):
    self.k, self.cap = int(k), max(int(factor), 1) * max(int(k), 1)
    self.keys = np.zeros((0,), np.int64)
    self.x = None
    self.peak_held = 0
    self.seen = 0

  @property
  def held(self) -> int:
    return int(self.keys.size)

  def add(self, key_N: np.ndarray, x_NxD: np.ndarray) -> None:
    key_N, x_NxD = np.asarray(key_N, np.int64), np.asarray(x_NxD, np.float32)
    self.seen += key_N.size
    keys = np.concatenate([self.keys, key_N])
    x = x_NxD if self.x is None else np.concatenate([self.x, x_NxD])
    self.peak_held = max(self.peak_held, keys.size)
    if keys.size > self.cap:
      keep = greedy_k_center(x, self.cap)
      keys, x = keys[keep], x[keep]
    self.keys, self.x = keys, x

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """(keys, score) where score is each pick's covering radius at the time it was chosen."""
    if self.x is None or self.k <= 0:
      return np.zeros((0,), np.int64), np.zeros((0,))
    idx = greedy_k_center(self.x, self.k)
    # Score: distance to the nearest other chosen point (how much each one adds).
    xs = self.x[idx]
    d = np.sum((xs[:, None] - xs[None]) ** 2, axis=-1)
    np.fill_diagonal(d, np.inf)
    score = np.sqrt(d.min(axis=1)) if idx.size > 1 else np.zeros((idx.size,))
    return self.keys[idx], score.astype(np.float64)
