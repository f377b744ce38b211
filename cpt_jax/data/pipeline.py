"""The training input pipeline: the mixer over the run's stores, prefetch, eval batches.

`Pipeline` builds on `domain_stores.DomainStores` (the run's domains, their
packed stores, the rows each role trains and evaluates on) with the
deterministic mixer (mixer.py), a producer thread that prefetches batches
speculatively (discarded when the weights, the replay rows or the state
change), the iterator state a checkpoint keeps, and eval batches.
`default_cache_dir`, `training_split` and `IndexedStore` live in
domain_stores.py and stay importable from here.
"""

from __future__ import annotations

import collections
import threading
from typing import Iterator, Mapping

from absl import logging
import ml_collections
import numpy as np

from cpt_jax import batch as batch_lib
from cpt_jax.schema import data as config_lib
from cpt_jax.data import domain_stores as stores_lib
from cpt_jax.data import mixer as mixer_lib
from cpt_jax.data import packing
from cpt_jax.data import tasks as tasks_lib

# Re-exported: callers import these from here (stages.py: default_cache_dir).
IndexedStore = stores_lib.IndexedStore
default_cache_dir = stores_lib.default_cache_dir
training_split = stores_lib.training_split

STATE_VERSION = 1


class Pipeline(stores_lib.DomainStores):
  """Mixed, packed, prefetched batches for one process; see make_pipeline."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, global_batch_size: int,
               process_index: int = 0, process_count: int = 1, workdir: str | None = None):
    config_lib.validate_data_config(cfg)
    if global_batch_size < process_count or global_batch_size % process_count:
      raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple "
                       f"of process_count {process_count}")
    super().__init__(cfg, workdir, process_index)
    self.global_batch_size = global_batch_size
    self.process_index, self.process_count = process_index, process_count
    self.batch_size = global_batch_size // process_count
    train_stores = [self._training_store(d, r) for d, r in zip(self.domains, self.roles)]
    rows = [s.num_rows if s is not None else 0 for s in train_stores]
    self._weights = config_lib.weights_from_spec(tasks_lib.mixture_weights(cfg), self.domains,
                                                 self.roles, rows)
    self.mixer = mixer_lib.Mixer(train_stores, self.domains, self.role_ids, cfg.seed,
                                 global_batch_size, process_index, process_count,
                                 self.start_id)
    self._cstate = self.mixer.initial_state()  # after the last batch returned
    self._pstate = self._cstate  # after the last batch queued
    self._queue: collections.deque = collections.deque()
    self._cv = threading.Condition()
    self._gen = 0
    self._error: BaseException | None = None
    self._closed = False
    self._prefetch = cfg.prefetch
    self._thread = None
    if self._prefetch:
      self._thread = threading.Thread(target=self._worker, name="cpt-data-prefetch", daemon=True)
      self._thread.start()
    logging.info("data pipeline: %d domains (%s), %d trainable rows, batch %d/%d, L=%d",
                 self.num_domains, ", ".join(f"{r}={self.roles.count(r)}" for r in batch_lib.ROLES),
                 sum(rows), self.batch_size, global_batch_size, self.seq_len)

  # --- replay selection (cpt_jax/replay) ------------------------------------
  def set_replay_rows(self, rows: Mapping[str, np.ndarray],
                      weights: Mapping[str, float] | None = None) -> None:
    """Restricts replay domains to `rows` (ids in their train stores) from the next batch.

    Rebuilds the mixer (the stores it indexes change) and, if given, sets the
    mixture weights; the consumer's counters are kept and prefetched batches
    are discarded.
    """
    with self._cv:
      for d, idx in rows.items():
        if d not in self.domains or self.roles[self.domains.index(d)] != "replay":
          raise ValueError(f"set_replay_rows: {d!r} is not a replay domain of this run")
        self._row_select[d] = np.asarray(idx, np.int64)
      stores = [self._training_store(d, r) for d, r in zip(self.domains, self.roles)]
      self.mixer = mixer_lib.Mixer(stores, self.domains, self.role_ids, self.cfg.seed,
                                   self.global_batch_size, self.process_index,
                                   self.process_count, self.start_id)
      if weights is not None:
        w = self._weights.copy()
        for name, v in weights.items():
          w[self.domains.index(name)] = float(v)
        self._weights = config_lib.check_weights(w, self.domains, self.roles)
      self._reset_producer()

  @property
  def replay_rows(self) -> dict[str, np.ndarray]:
    """{replay domain: selected row ids} of the domains restricted by a selection."""
    with self._cv:
      return {d: v.copy() for d, v in self._row_select.items()}
  # --- end replay selection -------------------------------------------------

  # -- public API -----------------------------------------------------------
  @property
  def step(self) -> int:
    """The step the next batch is for."""
    with self._cv:
      return self._cstate.step

  @property
  def weights(self) -> np.ndarray:
    with self._cv:
      return self._weights.copy()

  def set_weights(self, weights: Mapping[str, float] | np.ndarray) -> None:
    """New mixture weights from the next batch returned on.

    A mapping updates the named domains and keeps the others; an array gives
    every domain's weight in `domains` order. Speculative prefetched batches
    are discarded and the producer restarts from the consumer's state.
    """
    with self._cv:
      if isinstance(weights, Mapping):
        w = self._weights.copy()
        for name, v in weights.items():
          if name not in self.domains:
            raise ValueError(f"data.weights: unknown domain {name!r}")
          w[self.domains.index(name)] = float(v)
      else:
        w = np.asarray(weights, np.float64)
      w = config_lib.check_weights(w, self.domains, self.roles)
      if np.array_equal(w, self._weights):
        return
      self._weights = w
      self._reset_producer()

  def next_batch(self) -> dict[str, np.ndarray]:
    """This process's rows of the batch for `self.step` (see cpt_jax/batch.py)."""
    if not self._prefetch:
      with self._cv:
        state, w = self._cstate, self._weights
      batch, new = self.mixer.produce(state, w)
      with self._cv:
        self._advance(new)
      return batch
    with self._cv:
      while not self._queue and self._error is None and not self._closed:
        self._cv.wait()
      if self._error is not None:
        raise RuntimeError("data prefetch thread failed") from self._error
      if self._closed:
        raise RuntimeError("pipeline is closed")
      _, batch, new = self._queue.popleft()
      self._advance(new)
      self._cv.notify_all()
      return batch

  def state(self) -> dict:
    """JSON-serialisable iterator state (for the checkpoint)."""
    with self._cv:
      return {"version": STATE_VERSION, "seed": int(self.cfg.seed), "domains": list(self.domains),
              "rows": [int(x) for x in self.mixer.rows_C],
              "weights": [float(x) for x in self._weights], **self._cstate.to_json()}

  def restore(self, state: Mapping) -> None:
    """Continues from `state()`; with the same config, batches repeat bit for bit.

    If the run's domain list differs (a new stage), counters are matched by
    domain name and the configured weights are kept.
    """
    if int(state.get("version", -1)) != STATE_VERSION:
      raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION}")
    if int(state["seed"]) != int(self.cfg.seed):
      raise ValueError(f"data.seed is {self.cfg.seed} but the checkpoint used {state['seed']}")
    same = list(state["domains"]) == self.domains
    new = self.mixer.initial_state()
    new.step = int(state["step"])
    idx = {d: i for i, d in enumerate(state["domains"])}
    for i, d in enumerate(self.domains):
      if d in idx:
        new.consumed_C[i] = int(state["consumed"][idx[d]])
        new.tokens_C[i] = int(state["tokens"][idx[d]])
        if int(state["rows"][idx[d]]) != int(self.mixer.rows_C[i]):
          logging.warning("domain %s had %s rows at save time, now %d: resume is not bit-exact",
                          d, state["rows"][idx[d]], self.mixer.rows_C[i])
    with self._cv:
      if same:
        self._weights = config_lib.check_weights(np.asarray(state["weights"], np.float64),
                                                 self.domains, self.roles)
      else:
        logging.warning("data state domains differ from the run's; matching by name")
      self._cstate = new
      self._reset_producer()

  def stats(self) -> dict:
    """Tokens per domain and role, epochs per domain, skipped lines, weights."""
    with self._cv:
      st, w = self._cstate, self._weights.copy()
    rows = self.mixer.rows_C
    tokens_per_role = {r: 0 for r in batch_lib.ROLES}
    for r, t in zip(self.roles, st.tokens_C):
      tokens_per_role[r] += int(t)
    # Every store the run reads (built here if not yet): the same keys in every record.
    skipped = {f"{d}/{s}": int(self._store(d, s).meta["skipped_lines"])
               for d, s in self.run_splits()}
    return {
        "step": int(st.step),
        "tokens_per_domain": {d: int(t) for d, t in zip(self.domains, st.tokens_C)},
        "tokens_per_role": tokens_per_role,
        "rows_per_domain": {d: int(c) for d, c in zip(self.domains, st.consumed_C)},
        "epochs_per_domain": {d: (float(c) / n if n else 0.0)
                              for d, c, n in zip(self.domains, st.consumed_C, rows)},
        "skipped_lines": skipped,
        "weights": {d: float(x) for d, x in zip(self.domains, w)},
    }

  def training_rows(self, domains: list[str], num_rows: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """`num_rows` rows drawn round-robin from the training data of `domains`.

    Uses the rows each domain's role may train on (distill: the non-held-out
    validation rows), without touching the mixer's state. For estimates made
    at a stage's start (EWC Fisher, teacher reference losses). Global rows: the
    same on every process.
    """
    rng = np.random.default_rng([seed, 7919])
    planes, dom_ids, roles = [], [], []
    stores = {d: self._training_store(d, self.roles[self.domains.index(d)]) for d in domains}
    stores = {d: s for d, s in stores.items() if s is not None and s.num_rows > 0}
    if not stores:
      raise ValueError(f"no training rows in domains {domains}")
    names = sorted(stores)
    for i in range(num_rows):
      d = names[i % len(names)]
      planes.append(stores[d].gather(rng.integers(0, stores[d].num_rows, size=1)))
      dom_ids.append(self.domains.index(d))
      roles.append(batch_lib.role_id(self.roles[self.domains.index(d)]))
    return packing.rows_to_batch(np.concatenate(planes, axis=1), np.asarray(dom_ids, np.int32),
                                 np.asarray(roles, np.int32), self.start_id)

  def eval_batches(self, domain: str, batch_size: int,
                   max_rows: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Validation rows of `domain` in fixed order, packed like training rows.

    batch_size is global; each process gets its slice. The last batch is padded
    with all-zero rows (loss_weights 0). Rows carry role 'eval'.
    """
    if domain not in self.domains:
      raise ValueError(f"unknown domain {domain!r}; the run has {self.num_domains} domains")
    if batch_size % self.process_count:
      raise ValueError(f"eval batch_size {batch_size} not divisible by {self.process_count}")
    store = self._eval_store(domain)
    d = self.domains.index(domain)
    n = store.num_rows if max_rows is None else min(store.num_rows, max_rows)
    per = batch_size // self.process_count
    lo = self.process_index * per
    for start in range(0, n, batch_size):
      idx = np.arange(start + lo, start + lo + per)
      planes = np.zeros((3, per, self.seq_len), np.int32)
      valid = idx < n
      if valid.any():
        planes[:, valid] = store.gather(idx[valid])
      yield packing.rows_to_batch(planes, np.full((per,), d),
                                  np.full((per,), batch_lib.EVAL), self.start_id)

  def close(self) -> None:
    with self._cv:
      self._closed = True
      self._queue.clear()
      self._cv.notify_all()
    if self._thread is not None:
      self._thread.join(timeout=10)
    self.close_stores()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- internals (call with self._cv held) -----------------------------------
  def _advance(self, new: mixer_lib.MixerState) -> None:
    old = self._cstate
    rows = self.mixer.rows_C
    for d in np.nonzero(new.consumed_C != old.consumed_C)[0]:
      e_old, e_new = old.consumed_C[d] // rows[d], new.consumed_C[d] // rows[d]
      if e_new > e_old:
        logging.info("data: domain %s finished epoch %d at step %d", self.domains[d], e_new,
                     old.step)
    self._cstate = new

  def _reset_producer(self) -> None:
    self._gen += 1
    self._queue.clear()
    self._pstate = self._cstate
    self._cv.notify_all()

  def _worker(self) -> None:
    while True:
      with self._cv:
        while not self._closed and len(self._queue) >= self._prefetch:
          self._cv.wait()
        if self._closed:
          return
        gen, state, w = self._gen, self._pstate, self._weights
      try:
        batch, new = self.mixer.produce(state, w)
      except BaseException as e:  # surfaced by next_batch, unless its batch was discarded
        with self._cv:
          if gen != self._gen:  # made with replaced weights / state: never used
            continue
          self._error = e
          self._cv.notify_all()
        return
      with self._cv:
        if gen == self._gen:
          self._queue.append((gen, batch, new))
          self._pstate = new
          self._cv.notify_all()


def make_pipeline(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                  process_index: int = 0, process_count: int = 1,
                  workdir: str | None = None) -> Pipeline:
  """Builds (or loads from cache) the per-domain stores and starts prefetching."""
  return Pipeline(data_config, global_batch_size=global_batch_size,
                  process_index=process_index, process_count=process_count, workdir=workdir)
