"""Preemption: on SIGTERM (TPU maintenance, SLURM's time limit) save and exit 0.

The run stops at a step boundary every process agrees on, saves its checkpoint there
and raises `Preempted`; the command line (main.py) exits 0, so the launcher restarts
the same command, which resumes from that checkpoint.

  one process      `sigterm_requests()` (main.py runs in it) turns SIGTERM into a flag;
                   the hook reads it after each step
  several          JAX's coordination service catches SIGTERM on whichever process
  (jax.distributed) gets it and tells the others; `multihost_utils.
                   reached_preemption_sync_point(n)` is then True on every process at
                   the same call n (after the furthest one's current step). It talks to
                   no other process until a notice has come: 0.1 us a call, the step
                   does not slow (benchmarks/per_host.py)
  several, no      (a runtime JAX did not start) the flags are all-gathered after each
  jax.distributed  step

Calls are counted per process over the whole invocation (every stage, rollbacks
included): every process makes the same calls in the same order, so the counts agree
where the step numbers of successive stages would repeat. A SIGTERM before a stage's
first step (store building, the baseline) takes effect after that step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np

from cpt_jax.train import hooks as hooks_lib

_REQUESTED = threading.Event()  # set by the SIGTERM handler
_CALLS = [0]  # preemption checks so far in this process (the sync point's step id)


class Preempted(Exception):
  """A SIGTERM stopped the run after saving the checkpoint of `step` in `workdir`."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"preempted: saved the checkpoint of step {step} in {workdir}; run the "
                     "same command again to resume from it")
    self.step, self.workdir = step, workdir


@contextlib.contextmanager
def sigterm_requests() -> Iterator[None]:
  """Within: SIGTERM -> a preemption request; the previous handler comes back after. For
  a process without jax.distributed (whose own notifier catches SIGTERM: a handler here
  would replace it). Main thread only."""
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: request())
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def request() -> None:
  """Asks the running loop to save and stop at its next step boundary (what SIGTERM does)."""
  _REQUESTED.set()


def clear() -> None:
  """Forgets a request (a notebook running again after a preempted run)."""
  _REQUESTED.clear()


def _sync_point(n: int) -> bool:
  return multihost_utils.reached_preemption_sync_point(n)


def _any_process(flag: bool) -> bool:
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class Preemption(hooks_lib.Hook):
  """Says, after each step, whether the run saves and stops there (module docstring)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.stop_at: int | None = None  # the step the run was preempted at

  def start(self, state, saved):
    del state, saved
    self.stop_at = None

  def preempted(self, done: int) -> bool:
    if self.stop_at is not None:  # once agreed, it holds (a rollback does not undo it)
      return True
    _CALLS[0] += 1
    if jax.process_count() == 1:
      stop = _REQUESTED.is_set()
    elif jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service:
      stop = _sync_point(_CALLS[0])
    else:
      stop = _any_process(_REQUESTED.is_set())
    if stop:
      self.stop_at = done
      _REQUESTED.clear()  # acted on
    return stop
