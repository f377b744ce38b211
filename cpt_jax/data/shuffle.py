"""Bijective index shuffles in O(1) memory: a keyed Feistel permutation of [0, n).

`permute(pos_N, n, key)` returns the rows at positions pos_N of a pseudo-random
order of [0, n) without building the order: an 8-round balanced Feistel
network on the smallest even number of bits covering n, with cycle walking
(values >= n are permuted again until they land in [0, n); a start in [0, n)
always comes back to [0, n) on its own cycle, so the map stays a bijection of
[0, n)). The round function is splitmix64 of the right half xor a round key;
the round keys come from the integer key, so an epoch's order costs 64 bytes
whatever n is.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 8
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def round_keys(key: list[int]) -> np.ndarray:
  """ROUNDS uint64 round keys from a list of ints (e.g. [seed, domain, epoch, tag])."""
  return np.random.default_rng(key).integers(0, 2 ** 63, size=ROUNDS, dtype=np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser (uint64 -> uint64, wrapping)."""
  x = x + _GOLDEN
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
  mask = np.uint64((1 << half) - 1)
  sh = np.uint64(half)
  left, right = x >> sh, x & mask
  for k in keys:
    left, right = right, left ^ (_mix(right ^ k) & mask)
  return (left << sh) | right


def permute(pos_N: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
  """Positions pos_N (each in [0, n)) -> their items under the permutation of [0, n)."""
  pos_N = np.asarray(pos_N, np.int64)
  if n <= 1:
    return pos_N.copy()
  if pos_N.size and (pos_N.min() < 0 or pos_N.max() >= n):
    raise IndexError(f"positions outside [0, {n})")
  bits = max(2, int(n - 1).bit_length())
  half = (bits + 1) // 2
  x = pos_N.astype(np.uint64)
  todo = np.ones(x.shape, bool)
  while todo.any():  # cycle walking: at most a few rounds on average (domain < 4n)
    x[todo] = _feistel(x[todo], half, keys)
    todo = x >= np.uint64(n)
  return x.astype(np.int64)
