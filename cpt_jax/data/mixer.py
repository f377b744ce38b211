"""Deterministic host-side mixer over per-domain packed-row stores.

State is tiny: the step and, per domain, rows consumed so far (epoch =
consumed // rows, cursor = consumed % rows) and tokens delivered. The batch of
step s is a pure function of (seed, s, weights at s, state at s), and the state
at s is a function of the seed and the weights in force at steps < s, so
replaying the same weights from a checkpointed state gives the same batches.

Row choice at step s: `default_rng([seed, s])` places B systematic-sampling
points on the cumulative weights (each domain gets floor or ceil of B*p_d rows,
a zero-weight domain none) and shuffles the slots. Domain d's stream is epoch
after epoch of permutations of its rows, epoch e keyed by (seed, crc32(d), e):
a Feistel index shuffle (shuffle.py) evaluated at the cursor's positions only,
so no permutation is ever materialised (O(1) memory per domain and epoch).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from cpt_jax.data import packing
from cpt_jax.data import shuffle as shuffle_lib
from cpt_jax.data import store as store_lib

_MIX_TAG = 0x6D6978  # 'mix'
_PERM_TAG = 0x70726D  # 'prm'


@dataclasses.dataclass
class MixerState:
  """Where the mixer stands: the step of the next batch and per-domain counters."""
  step: int
  consumed_C: np.ndarray  # int64 rows taken from each domain's stream
  tokens_C: np.ndarray  # int64 non-padding tokens delivered (global batch)

  def copy(self) -> "MixerState":
    return MixerState(self.step, self.consumed_C.copy(), self.tokens_C.copy())

  def to_json(self) -> dict:
    return {"step": int(self.step), "consumed": [int(x) for x in self.consumed_C],
            "tokens": [int(x) for x in self.tokens_C]}

  @classmethod
  def from_json(cls, d: dict) -> "MixerState":
    return cls(int(d["step"]), np.asarray(d["consumed"], np.int64),
               np.asarray(d["tokens"], np.int64))


def assign_slots(seed: int, step: int, weights_C: np.ndarray, batch_size: int) -> np.ndarray:
  """Domain of each of the B rows of `step` (pure function of its arguments)."""
  rng = np.random.default_rng([seed, step, _MIX_TAG])
  cum_C = np.cumsum(np.asarray(weights_C, np.float64))
  total = cum_C[-1]
  x_B = (rng.random() + np.arange(batch_size)) / batch_size * total
  x_B = np.minimum(x_B, np.nextafter(total, 0.0))
  dom_B = np.searchsorted(cum_C, x_B, side="right")
  return dom_B[rng.permutation(batch_size)].astype(np.int64)


class Mixer:
  """Produces (per-process slices of) global batches from per-domain stores."""

  def __init__(self, stores: Sequence[store_lib.PackedStore | None], domains: Sequence[str],
               role_ids: Sequence[int], seed: int, global_batch_size: int,
               process_index: int = 0, process_count: int = 1, start_id: int = 0):
    """start_id: the input token at each row piece's start (the vocabulary's BOS or 0)."""
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                       f"process_count {process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.stores = list(stores)
    self.domains = list(domains)
    self.role_ids_C = np.asarray(role_ids, np.int32)
    self.seed = int(seed)
    self.start_id = int(start_id)
    self.batch_size = global_batch_size
    per = global_batch_size // process_count
    self.local = slice(process_index * per, (process_index + 1) * per)
    self.rows_C = np.array([s.num_rows if s is not None else 0 for s in self.stores], np.int64)
    self._name_seed = [zlib.crc32(d.encode("utf-8")) for d in self.domains]
    self._round_keys: dict[tuple[int, int], np.ndarray] = {}

  def initial_state(self) -> MixerState:
    n = len(self.domains)
    return MixerState(0, np.zeros(n, np.int64), np.zeros(n, np.int64))

  def _keys(self, d: int, epoch: int) -> np.ndarray:
    """The shuffle keys of (domain d, epoch): 64 bytes, kept for the few pairs in use."""
    k = self._round_keys.get((d, epoch))
    if k is None:
      if len(self._round_keys) > 4 * len(self.domains) + 16:
        self._round_keys.clear()
      k = self._round_keys[(d, epoch)] = shuffle_lib.round_keys(
          [self.seed, self._name_seed[d], epoch, _PERM_TAG])
    return k

  def rows_at(self, dom_N: np.ndarray, epoch_N: np.ndarray, pos_N: np.ndarray) -> np.ndarray:
    """Rows at positions pos_N of each domain's order in its epoch (one call for all)."""
    keys_NxK = np.stack([self._keys(int(d), int(e)) for d, e in zip(dom_N, epoch_N)]
                        ) if len(pos_N) else np.zeros((0, shuffle_lib.ROUNDS), np.uint64)
    return shuffle_lib.permute(pos_N, self.rows_C[dom_N], keys_NxK)

  def plan(self, state: MixerState, weights_C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(domain_B, row_B) of the global batch at state.step."""
    dom_B = assign_slots(self.seed, state.step, weights_C, self.batch_size)
    if (self.rows_C[dom_B] == 0).any():
      bad = self.domains[int(dom_B[self.rows_C[dom_B] == 0][0])]
      raise ValueError(f"domain {bad!r} was sampled but has no training rows")
    order = np.argsort(dom_B, kind="stable")
    sorted_dom = dom_B[order]
    first = np.searchsorted(sorted_dom, sorted_dom, side="left")
    rank_B = np.empty_like(dom_B)
    rank_B[order] = np.arange(dom_B.size) - first
    c_B = state.consumed_C[dom_B] + rank_B
    n_B = self.rows_C[dom_B]
    epoch_B, pos_B = c_B // n_B, c_B % n_B
    return dom_B, self.rows_at(dom_B, epoch_B, pos_B)

  def produce(self, state: MixerState, weights_C: np.ndarray) -> tuple[dict, MixerState]:
    """This process's slice of the batch at state.step, and the next state."""
    dom_B, row_B = self.plan(state, weights_C)
    new = state.copy()
    new.step += 1
    np.add.at(new.consumed_C, dom_B, 1)
    for d in np.unique(dom_B):
      m = dom_B == d
      new.tokens_C[d] += int(self.stores[d].row_tokens(row_B[m]).sum())
    local_dom_B, local_row_B = dom_B[self.local], row_B[self.local]
    L = self.stores[int(local_dom_B[0])].seq_len
    planes = np.empty((3, local_dom_B.size, L), np.int32)
    for d in np.unique(local_dom_B):
      m = local_dom_B == d
      planes[:, m] = self.stores[d].gather(local_row_B[m])
    return (packing.rows_to_batch(planes, local_dom_B, self.role_ids_C[local_dom_B],
                                  self.start_id), new)
