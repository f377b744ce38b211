"""Online replay refresh steered by the loss training already computes: zero extra FLOPs.

Every log window the training step reports each domain's mean token CE over the
rows it trained on (the log record's `domain_loss`); for a replay domain those
rows are its buffer rows as they are replayed. Strategy `steered` reads that and
runs no forward of its own:

  rise_d   = the domain's replay loss in the latest window minus in the first window
             after the stage began (nats per token), averaged with the previous
             refresh's estimate (a window holds few replayed rows: a noisy measure)
  quota    every `replay.online_every` steps the buffer's k rows are re-split over
           the domains by quota.allocate(k, pool sizes, rise, `replay.steer_quota`):
           the domains whose replayed rows' loss rises get more rows
  rotation per domain, its `replay.online_swap` x (buffer rows) oldest rows (the ones
           replayed most since they entered: their training loss falls by repetition
           and says least about forgetting) give way to fresh rows of a rolling,
           seeded order, which need no scoring; a domain whose quota shrinks drops its
           oldest rows, one whose quota grows takes fresh rows

The step reports losses per domain, not per row (a batch's row ids stay in the
data pipeline), so the steering is per domain; inside a domain the rows rotate
by age. The log window must not be longer than the refresh period for every
refresh to see a new window (the suite sets train.log_every to online_every).
State (ages, cursors, loss history) is host JSON in the checkpoint.
"""

from __future__ import annotations

import zlib
from typing import Callable, Mapping

import numpy as np

from cpt_jax.replay import quota as quota_lib


def loss_rise(first: Mapping[str, float], last: Mapping[str, float],
              previous: Mapping[str, float] | None = None) -> dict[str, float]:
  """Per domain: last - first window's replay loss, averaged with `previous` (its last
  estimate) when there is one."""
  now = {d: float(last[d]) - float(first[d]) for d in last if d in first}
  prev = previous or {}
  return {d: (v + float(prev[d])) / 2 if d in prev else v for d, v in now.items()}


def refresh_rows(buffers: Mapping[str, np.ndarray], ages: Mapping[str, np.ndarray],
                 fresh: Mapping[str, np.ndarray], sizes: Mapping[str, int],
                 swap: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
  """(buffers, ages, rows swapped) after one refresh.

  buffers[d]: row ids [N_d]; ages[d]: refreshes each row has spent in the buffer [N_d];
  fresh[d]: candidate rows not in the buffer, in the order they are to be taken;
  sizes[d]: the buffer rows d keeps. A shrinking domain drops its oldest rows, a
  growing one takes fresh rows, then each swaps int(swap x size) oldest rows for fresh
  ones (ties by position, stable). Survivors age by one; new rows start at 0.
  """
  out_b, out_a, swapped = {}, {}, 0
  for d in sorted(buffers):
    buf, age = np.asarray(buffers[d], np.int64), np.asarray(ages[d], np.int64)
    new = np.asarray(fresh.get(d, np.zeros((0,), np.int64)), np.int64)
    size = int(sizes[d])
    by_age = np.argsort(-age, kind="stable")  # oldest first
    keep = np.sort(by_age[max(buf.size - size, 0):])  # a shrinking domain drops the oldest
    buf, age = buf[keep], age[keep]
    take = min(max(size - buf.size, 0), new.size)
    buf, age = np.concatenate([buf, new[:take]]), np.concatenate([age, np.full(take, -1)])
    new = new[take:]
    s = min(int(swap * buf.size), new.size)
    out_pos = np.argsort(-age, kind="stable")[:s]
    buf, age = buf.copy(), age.copy()
    buf[out_pos], age[out_pos] = new[:s], -1
    swapped += int(s)
    order = np.argsort(buf, kind="stable")
    out_b[d], out_a[d] = buf[order], age[order] + 1
  return out_b, out_a, swapped


class SteeredBuffer:
  """The `steered` refresh for a ReplayManager (see the module docstring); `log(msg)`
  reports each refresh."""

  name = "steered"  # its key in the checkpoint's host state and in the summary

  def __init__(self, manager, host: dict | None, log: Callable[[str], None]):
    self.m, self.log = manager, log
    o = (host or {}).get("steered") or {}
    rows = manager.pipeline.replay_rows
    self.ages = {d: np.asarray(o["ages"][d], np.int64) if "ages" in o
                 else np.zeros(np.size(rows[d]), np.int64) for d in rows}
    self.cursor = {d: int(v) for d, v in o.get("cursor", {}).items()}
    self.first = {d: float(v) for d, v in o.get("first", {}).items()}
    self.last = {d: float(v) for d, v in o.get("last", {}).items()}
    self.rise = {d: float(v) for d, v in o.get("rise", {}).items()}
    self.refreshes, self.swaps = int(o.get("refreshes", 0)), int(o.get("swaps", 0))

  def observe(self, record: Mapping) -> None:
    """Takes the replay domains' training loss from a log record."""
    for d, v in (record.get("domain_loss") or {}).items():
      if d in self.ages:
        self.first.setdefault(d, float(v))
        self.last[d] = float(v)

  def _fresh(self, d: str, buf: np.ndarray, n: int) -> np.ndarray:
    """The next n rows of d's rolling, seeded order that are not in the buffer."""
    size = self.m.stores[d].num_rows
    order = np.random.default_rng([self.m.config.seed, zlib.crc32(d.encode()),
                                   0x737465]).permutation(size)
    c0 = self.cursor.get(d, 0)
    cand = order[(c0 + np.arange(min(n + buf.size, size))) % size]
    cand = cand[~np.isin(cand, buf)][:n]
    self.cursor[d] = (c0 + n) % size
    return cand

  def cost(self, k: int) -> tuple[float, float]:
    """(TFLOPs, seconds) of k refreshes: none, they run no forward."""
    del k
    return 0.0, 0.0

  def refresh(self, step: int, state) -> None:
    """Re-splits and rotates the buffer (no forward runs: `state` is not read)."""
    del state
    rows = self.m.pipeline.replay_rows
    sizes = {d: int(np.size(v)) for d, v in rows.items()}
    pools = {d: s.num_rows for d, s in self.m.stores.items()}
    strength = float(self.m.rcfg.steer_quota)
    if strength > 0 and self.last:
      self.rise = loss_rise(self.first, self.last, self.rise)
      sizes = quota_lib.allocate(sum(sizes.values()), pools, self.rise, strength)
    swap = float(self.m.rcfg.online_swap)
    fresh = {d: self._fresh(d, rows[d], max(sizes[d] - np.size(rows[d]), 0)
                            + int(swap * sizes[d])) for d in rows}
    new_rows, self.ages, swapped = refresh_rows(rows, self.ages, fresh, sizes, swap)
    self.swaps += swapped
    self.refreshes += 1
    sizes = {d: int(v.size) for d, v in new_rows.items()}
    # Each buffer row still replayed equally often: replay weights follow the sizes.
    self.m.pipeline.set_replay_rows(new_rows, self.m.weights_at(step, new_rows))
    self.log(f"replay steered refresh at step {step}: {self.swaps} swaps so far; "
             f"buffer rows per domain {sizes}; loss rise {self.rise}")

  def state_dict(self) -> dict:
    return {"ages": {d: [int(x) for x in v] for d, v in self.ages.items()},
            "cursor": dict(self.cursor), "first": dict(self.first), "last": dict(self.last),
            "rise": dict(self.rise), "refreshes": self.refreshes, "swaps": self.swaps}
