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


def _feistel(x: np.ndarray, half: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """One pass of the network; x, half: N; keys: NxROUNDS (all uint64)."""
  mask = (np.uint64(1) << half) - np.uint64(1)
  left, right = x >> half, x & mask
  for r in range(keys.shape[1]):
    left, right = right, left ^ (_mix(right ^ keys[:, r]) & mask)
  return (left << half) | right


def permute(pos_N: np.ndarray, n, keys) -> np.ndarray:
  """Positions pos_N -> their items under the permutation of [0, n) keyed by `keys`.

  n and keys may differ per position (n_N, keys_NxROUNDS), so the positions of several
  domains and epochs go through in one call; or be one n and one key vector for all.
  """
  pos_N = np.asarray(pos_N, np.int64).reshape(-1)
  n_N = np.broadcast_to(np.asarray(n, np.int64), pos_N.shape)
  keys = np.asarray(keys, np.uint64)
  keys_NxK = np.broadcast_to(keys, pos_N.shape + keys.shape[-1:])
  if pos_N.size and ((pos_N < 0) | (pos_N >= np.maximum(n_N, 1))).any():
    raise IndexError("positions outside [0, n)")
  out = pos_N.copy()
  big = n_N > 1  # n <= 1: the identity
  if not big.any():
    return out
  n_M = n_N[big].astype(np.uint64)
  # bits: the smallest count covering [0, n) (at least 2), split into two equal halves.
  n_U, inv = np.unique(n_M, return_inverse=True)  # few distinct n: one per domain
  bits = np.array([max(2, int(v - 1).bit_length()) for v in n_U], np.int64)[inv.reshape(-1)]
  half = ((bits + 1) // 2).astype(np.uint64)
  x = pos_N[big].astype(np.uint64)
  keys_M = keys_NxK[big]
  todo = np.arange(x.size)
  while todo.size:  # cycle walking: a few passes on average (domain < 4n)
    x[todo] = _feistel(x[todo], half[todo], keys_M[todo])
    todo = todo[x[todo] >= n_M[todo]]
  out[big] = x.astype(np.int64)
  return out
