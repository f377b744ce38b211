"""The run's per-domain packed stores, and which of their rows each role uses.

`DomainStores` resolves the run's domains and roles from the data config,
checks that every split they need exists, and builds (or loads from the cache)
one packed store per (domain, split) on first use. A role trains on
`training_split(role)`; a distill domain trains on the head of its validation
store and is evaluated on the tail (`data.eval_holdout`); a replay domain can be
restricted to selected rows (`data.replay_selection`, `IndexedStore`).
`pipeline.Pipeline` adds the mixer and the prefetch thread on top.
"""

from __future__ import annotations

import os
import tempfile
import threading

from absl import logging
import ml_collections
import numpy as np

from cpt_jax import batch as batch_lib
from cpt_jax.schema import data as config_lib
from cpt_jax.data import selection as selection_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.data import store as store_lib
from cpt_jax.data import tasks as tasks_lib
from cpt_jax.data import vocab as vocab_lib


def default_cache_dir(cfg, workdir: str | None) -> str:
  if cfg.cache_dir:
    return cfg.cache_dir
  if workdir:
    return os.path.join(workdir, "data_cache")
  return os.path.join(tempfile.gettempdir(), "cpt_jax_data_cache")


def training_split(role: str) -> str | None:
  """Split a role trains on: train for new/replay, validation for distill."""
  return {"new": "train", "replay": "train", "distill": "validation"}.get(role)


def run_splits(domains, roles) -> list[tuple[str, str]]:
  """Every (domain, split) a run reads: each role's training split, and every domain's
  validation split (evaluation; a distill domain's eval tail is its end)."""
  return [(d, s) for d, r in zip(domains, roles)
          for s in dict.fromkeys((training_split(r), "validation")) if s]


def resolve_domains(cfg) -> tuple[str, dict[str, str], frozenset]:
  """(corpus_dir, {domain: role}, the domains that are seqio Tasks) of a data config.

  The available domains are the corpus folders (none when only seqio Tasks are
  used and there is no corpus) plus the Tasks of data.seqio_tasks / seqio_mixture.
  """
  corpus_dir = sources_lib.find_corpus_dir(cfg.corpus_dir) if cfg.source != "tfds" else ""
  seqio_tasks, mixture_tasks = tasks_lib.seqio_domains(cfg)
  seqio_names = frozenset(seqio_tasks) | frozenset(mixture_tasks)
  try:
    available = sources_lib.list_domains(corpus_dir, cfg.source)
  except sources_lib.DataError:
    if not seqio_names or cfg.corpus_dir:
      raise
    available = []
  if available is not None:
    available = sorted(set(available) | seqio_names)
  return corpus_dir, config_lib.resolve_roles(cfg, available, mixture_tasks), seqio_names


def make_source(cfg, corpus_dir: str, domain: str, split: str,
                seqio_names: frozenset = frozenset()) -> sources_lib.Source:
  """The Source of (domain, split): a registered seqio Task's or the corpus's."""
  if domain in seqio_names:
    return tasks_lib.seqio_source(domain, split, vocab_lib.make_vocab(cfg.vocab).key)
  return sources_lib.make_source(cfg, corpus_dir, domain, split)


def run_sources(cfg, corpus_dir: str, domains, roles, seqio_names: frozenset = frozenset()
                ) -> dict[tuple[str, str], sources_lib.Source]:
  """{(domain, split): Source} of `run_splits`, each file checked readable and non-empty;
  DataError naming the first missing or unreadable file."""
  out = {}
  for d, s in run_splits(domains, roles):
    src = out[(d, s)] = make_source(cfg, corpus_dir, d, s, seqio_names)
    sources_lib.check_readable(src)
  return out


def check_splits(cfg: ml_collections.ConfigDict) -> None:
  """The checks `DomainStores` makes at its start, without building it: every split the data
  config `cfg` reads exists and is readable (e.g. every stage's, before the first runs)."""
  corpus_dir, role_of, seqio_names = resolve_domains(cfg)
  domains = sorted(role_of)
  run_sources(cfg, corpus_dir, domains, [role_of[d] for d in domains], seqio_names)


class DomainStores:
  """The packed stores of a run's domains, built lazily; the base of `pipeline.Pipeline`."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | None = None,
               process_index: int = 0):
    """process_index: this process; only process 0 builds stores (unless
    data.build_on_every_process), the others wait for them to be published."""
    self.cfg = cfg
    self.process_index = process_index
    self.seq_len = cfg.seq_len
    self.corpus_dir, role_of, self.seqio_names = resolve_domains(cfg)
    self.domains: list[str] = sorted(role_of)
    self.roles: list[str] = [role_of[d] for d in self.domains]
    self.role_ids = np.array([batch_lib.role_id(r) for r in self.roles], np.int32)
    self.vocab = vocab_lib.make_vocab(cfg.vocab)
    self.start_id = vocab_lib.start_id(self.vocab, cfg.get("add_bos", "auto"))
    self.cache_dir = default_cache_dir(cfg, workdir)
    # Every split the run reads (training, and validation for evaluation) exists and is
    # readable before anything is built or trained.
    self._sources = run_sources(cfg, self.corpus_dir, self.domains, self.roles,
                                self.seqio_names)
    self._stores: dict[tuple[str, str], store_lib.PackedStore] = {}
    self._store_lock = threading.Lock()
    # --- replay selection: replay domains restricted to selected rows (cpt_jax/replay) ---
    self._row_select: dict[str, np.ndarray] = {}
    if cfg.get("replay_selection", ""):
      self._load_replay_selection(cfg.replay_selection)
    # --- end replay selection ---

  @property
  def num_domains(self) -> int:
    return len(self.domains)

  def run_splits(self) -> list[tuple[str, str]]:
    """Every (domain, split) the run reads: each role's training split, and every domain's
    validation split (evaluation)."""
    return run_splits(self.domains, self.roles)

  # -- stores ---------------------------------------------------------------
  def _validation_split_rows(self, domain: str) -> tuple[int, int]:
    """(rows distill training may use, total rows) of a domain's validation store.

    The tail fraction `data.eval_holdout` is kept for evaluation only, so a
    distill domain is never evaluated on rows it was distilled on.
    """
    n = self._store(domain, "validation").num_rows
    held = int(round(n * float(self.cfg.eval_holdout)))
    if self.cfg.eval_holdout > 0:
      held = min(max(held, 1), n - 1) if n > 1 else 0
    return n - held, n

  def _training_store(self, domain: str, role: str):
    split = training_split(role)
    if split is None:
      return None
    store = self._store(domain, split)
    if split == "validation":
      usable, _ = self._validation_split_rows(domain)
      store = store.slice(0, usable)
    if role == "replay" and domain in self._row_select:  # replay selection
      store = IndexedStore(store, self._row_select[domain])
    return store

  # --- replay selection (cpt_jax/replay) ------------------------------------
  def full_training_store(self, domain: str):
    """A replay domain's whole train store, ignoring any replay selection."""
    return self._store(domain, "train")

  def store_names(self) -> dict[str, str]:
    """{replay domain: its packed train store's folder name (embeds the cache key)}."""
    return {d: os.path.basename(self._store(d, "train").path)
            for d, r in zip(self.domains, self.roles) if r == "replay"}

  def _load_replay_selection(self, path: str) -> None:
    rows, meta = selection_lib.read_selection(path)
    selection_lib.check_stores(meta, self.store_names(), path)
    for d, idx in rows.items():
      if d not in self.domains or self.roles[self.domains.index(d)] != "replay":
        logging.warning("replay selection %s: domain %s is not a replay domain of this run; "
                        "ignored", path, d)
        continue
      n = self._store(d, "train").num_rows
      if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"data.replay_selection={path!r}: row ids of {d!r} outside [0, {n})")
      self._row_select[d] = np.asarray(idx, np.int64)
  # --- end replay selection -------------------------------------------------

  def _eval_store(self, domain: str) -> store_lib.PackedStore:
    start, n = self._validation_split_rows(domain)
    store = self._store(domain, "validation")
    return store.slice(start, n) if self.cfg.eval_holdout > 0 else store

  def build_job(self, domain: str, split: str) -> store_lib.BuildJob:
    """What building the store of (domain, split) takes (data/build.py runs these)."""
    src = self._sources.get((domain, split)) or make_source(
        self.cfg, self.corpus_dir, domain, split, self.seqio_names)
    return store_lib.BuildJob(
        src, self.cfg.vocab, self.seq_len, self.cache_dir, append_eos=self.cfg.append_eos,
        on_bad_line=self.cfg.on_bad_line, max_docs=self.cfg.max_docs,
        shard_rows=self.cfg.shard_rows, buffer_tokens=self.cfg.build_buffer_tokens)

  def build_jobs(self) -> list[store_lib.BuildJob]:
    """The build jobs of every store the run reads (`run_splits`)."""
    return [self.build_job(d, s) for d, s in self.run_splits()]

  def close_stores(self) -> None:
    """Closes every store's open handles (remote stores; a later read reopens them)."""
    for st in self._stores.values():
      st.close()

  def _store(self, domain: str, split: str) -> store_lib.PackedStore:
    with self._store_lock:
      key = (domain, split)
      if key not in self._stores:
        job = self.build_job(domain, split)
        if self.process_index == 0 or self.cfg.build_on_every_process:
          self._stores[key] = job.run(self.vocab)
        else:  # process 0 builds it into the shared cache_dir
          self._stores[key] = store_lib.wait_for(job.src, job.cache_dir, job.key(self.vocab),
                                                 self.cfg.store_wait_seconds)
      return self._stores[key]


class IndexedStore:
  """A PackedStore restricted to rows `idx_N` (no copy): row i is base row idx_N[i]."""

  def __init__(self, base, idx_N: np.ndarray):
    self.base, self.idx_N = base, np.asarray(idx_N, np.int64)
    self.path = base.path
    self.meta = dict(base.meta, selected_rows=int(self.idx_N.size))
    self.seq_len = base.seq_len

  @property
  def num_rows(self) -> int:
    return int(self.idx_N.size)

  def gather(self, idx_B: np.ndarray) -> np.ndarray:
    return self.base.gather(self.idx_N[np.asarray(idx_B, np.int64)])

  def row_tokens(self, idx_B: np.ndarray) -> np.ndarray:
    return self.base.row_tokens(self.idx_N[np.asarray(idx_B, np.int64)])
