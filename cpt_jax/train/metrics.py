"""Metric sinks (JSONL + TensorBoard event files; on a resume the records past its step are
dropped) and a matmul peak probe for MFU.

In a bucket folder (gs://) a file cannot be appended to: each sink keeps its file's bytes
and uploads the whole object (readers see the previous upload or this one, never a part) at
most every `REMOTE_SYNC_SECONDS` and when it closes, as tf.io.gfile's GCS writer does.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import tempfile
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from cpt_jax import batch as batch_lib
from cpt_jax import paths

REMOTE_SYNC_SECONDS = 30.0


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.floating, float)):
    v = float(v)
    return v if math.isfinite(v) else str(v)
  if isinstance(v, (np.integer, int)):
    return int(v)
  if isinstance(v, Mapping):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple, np.ndarray)):
    return [_jsonable(x) for x in np.asarray(v).tolist()] if isinstance(v, np.ndarray) \
        else [_jsonable(x) for x in v]
  return v


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """{'a': {'b': 1}} -> {'a/b': 1.0}, keeping scalars only."""
  out = {}
  for k, v in metrics.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "/"))
    elif np.ndim(v) == 0 and isinstance(v, (int, float, np.number)):
      out[key] = float(v)
  return out


class SyncedFile:
  """A file opened for appending: a local file as it is; for a bucket path, a local
  temporary file whose whole content is uploaded by `sync` (rate-limited) and `close`."""

  def __init__(self, path: str, binary: bool = False):
    self.path = path
    self.remote = paths.is_remote(path)
    mode = "ab" if binary else "a"
    kw = {} if binary else {"encoding": "utf-8"}
    if not self.remote:
      paths.as_path(path).parent.mkdir(parents=True, exist_ok=True)
      self.file = open(path, mode, **kw)
      return
    self._local = tempfile.NamedTemporaryFile(prefix="cpt_jax-", delete=False).name
    remote = paths.as_path(path)
    with open(self._local, "wb") as f:
      f.write(remote.read_bytes() if remote.exists() else b"")
    self.file = open(self._local, mode, **kw)
    self._synced = time.monotonic()

  def write(self, data) -> None:
    self.file.write(data)

  def flush(self) -> None:
    self.file.flush()
    self.sync(force=False)

  def sync(self, force: bool = True) -> None:
    """Uploads the whole file (a bucket path; at most every REMOTE_SYNC_SECONDS unless forced)."""
    if not self.remote or (not force and time.monotonic() - self._synced < REMOTE_SYNC_SECONDS):
      return
    self.file.flush()
    with open(self._local, "rb") as f:
      paths.write_atomic(self.path, f.read())
    self._synced = time.monotonic()

  def close(self) -> None:
    if self.file.closed:
      return
    self.file.flush()
    self.sync()
    self.file.close()
    if self.remote:
      os.remove(self._local)


class LocalEventFile:
  """TensorBoard scalars in an event file, without TensorFlow.

  tensorboard's own EventFileWriter and clu's writer both go through tf.io.gfile and so
  load TensorFlow when it is installed (and tf's GCS client has no endpoint override); this
  writes the same records with plain file I/O, into a bucket folder through `SyncedFile`.
  """

  def __init__(self, folder: str):
    paths.as_path(folder).mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
    self._file = SyncedFile(os.path.join(folder, name), binary=True)
    self._records = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricsWriter:
  """Appends one JSON object per logged step to DIR/metrics.jsonl (eval: DIR/eval.jsonl) and
  writes scalars to TensorBoard event files under DIR/tensorboard (process 0 only).

  `start(step)` (a run continuing from `step`) first drops every record past `step`, so the
  files read as one uninterrupted run; without it the files open on the first write.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.eval_path = os.path.join(workdir, "eval.jsonl")
    self.tb_dir = os.path.join(workdir, "tensorboard") if tensorboard else None
    self._file = self._eval_file = self._tb = None

  def start(self, step: int) -> dict[str, int]:
    """Drops the records past `step` (files rewritten atomically) and opens the sinks;
    returns {file: records dropped} of the files that had any."""
    if not self.enabled:
      return {}
    dropped = {p: truncate_jsonl(p, step) for p in (self.path, self.eval_path)}
    tb = paths.as_path(self.tb_dir) if self.tb_dir is not None else None
    if tb is not None and tb.is_dir():
      for f in paths.files_under(tb):
        if "tfevents" in f.name:
          dropped[os.fspath(f)] = truncate_events(os.fspath(f), step)
    self._open()
    top = os.fspath(paths.as_path(self.path).parent)
    return {os.fspath(paths.as_path(p))[len(top):].lstrip("/"): n
            for p, n in dropped.items() if n}

  def _open(self) -> None:
    if self._file is not None:
      return
    paths.as_path(self.path).parent.mkdir(parents=True, exist_ok=True)
    self._file = SyncedFile(self.path)
    self._eval_file = SyncedFile(self.eval_path)
    if self.tb_dir is not None:
      self._tb = LocalEventFile(self.tb_dir)

  def write(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
    """kind 'train' goes to metrics.jsonl, 'eval' to eval.jsonl (and TensorBoard 'eval/')."""
    if not self.enabled:
      return
    self._open()
    record = {"step": int(step), "time": time.time(), **_jsonable(dict(metrics))}
    f = self._file if kind == "train" else self._eval_file
    f.write(json.dumps(record) + "\n")
    f.flush()
    if self._tb is not None:
      self._tb.write_scalars(int(step), flatten(metrics, "" if kind == "train" else kind + "/"))
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled or self._file is None:
      return
    self._file.close()
    self._eval_file.close()
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def truncate_jsonl(path: str, step: int) -> int:
  """Drops the records of a JSONL metrics file past `step`, and a line cut by a crash;
  rewrites it atomically if any went. Returns how many lines went."""
  p = paths.as_path(path)
  if not p.exists():
    return 0
  lines = p.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      ok = line.endswith("\n") and int(json.loads(line)["step"]) <= step
    except (ValueError, KeyError, TypeError):
      ok = False
    if ok:
      keep.append(line)
  if len(keep) < len(lines):
    paths.write_atomic(path, "".join(keep).encode("utf-8"))
  return len(lines) - len(keep)


def truncate_events(path: str, step: int) -> int:
  """Drops the events of a TensorBoard event file past `step`, and a record cut by a crash
  (TFRecord framing: length, its CRC, the Event, its CRC; kept records are copied as they
  are); rewrites it atomically if any went. Returns how many records went."""
  data = paths.as_path(path).read_bytes()
  keep, pos, total = [], 0, 0
  while pos < len(data):
    total += 1
    if pos + 12 > len(data):
      break
    (n,) = struct.unpack_from("<Q", data, pos)
    end = pos + 12 + n + 4
    if end > len(data):
      break
    try:
      event_step = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]).step
    except Exception:  # pylint: disable=broad-except  # a damaged record ends the file
      break
    if event_step <= step:
      keep.append(data[pos:end])
    pos = end
  if len(keep) < total:
    paths.write_atomic(path, b"".join(keep))
  return total - len(keep)


def read_metrics(workdir: str, kind: str = "train") -> list[dict]:
  """All records of DIR/metrics.jsonl (kind 'train') or DIR/eval.jsonl ('eval')."""
  path = paths.as_path(workdir) / ("metrics.jsonl" if kind == "train" else "eval.jsonl")
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5,
                        min_seconds: float = 0.02) -> float:
  """FLOP/s of an n x n matmul on the default device: the best of `repeats` timings, each
  of enough products issued back to back (at least `min_seconds` of them) that the wait
  for the result is not counted as work (on a GPU one 8192^3 bf16 product takes ~1.4 ms
  and the round trip ~0.2 ms; on a CPU one product is timed alone)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  t = time.perf_counter()
  f(a, b).block_until_ready()
  calls = int(min(50, max(1, math.ceil(min_seconds / max(time.perf_counter() - t, 1e-9)))))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(calls):
      out = f(a, b)  # one stream: the last to finish is the last issued
    out.block_until_ready()
    best = min(best, (time.perf_counter() - t) / calls)
  return 2 * n ** 3 / best


def named_weights(domains, weights) -> dict[str, float]:
  """Mixture weights as a distribution over domains."""
  w = np.asarray(weights, np.float64)
  w = w / max(w.sum(), 1e-30)
  return {d: float(x) for d, x in zip(domains, w)}


class Window:
  """Accumulates fetched step metrics between two log writes."""

  def __init__(self, num_domains: int):
    self.steps = 0
    self.scalars: dict[str, float] = {}
    self.counts: dict[str, int] = {}  # steps that reported each scalar (kd_term: teacher steps)
    self.domain_ce = np.zeros(num_domains)
    self.domain_tok = np.zeros(num_domains)
    self.role_ce = np.zeros(len(batch_lib.ROLES))
    self.role_tok = np.zeros(len(batch_lib.ROLES))

  def add(self, m: dict) -> None:
    self.steps += 1
    self.domain_ce += m["domain_ce_sum"]
    self.domain_tok += m["domain_tokens"]
    self.role_ce += m["role_ce_sum"]
    self.role_tok += m["role_tokens"]
    for k, v in m.items():
      if np.ndim(v) == 0 and k not in ("teacher_rows", "pullback_rows"):
        self.scalars[k] = self.scalars.get(k, 0.0) + float(v)
        self.counts[k] = self.counts.get(k, 0) + 1

  def mean(self, key: str) -> float:
    """The mean of scalar `key` over the window's steps that reported it."""
    return self.scalars[key] / self.counts[key]

  def summary(self, domains) -> dict[str, Any]:
    # A scalar only some steps report (kd_term, replay_kd_term: steps that ran the
    # teacher) is the mean over those steps.
    out = {k: self.mean(k) for k in self.scalars}
    out["domain_loss"] = {d: float(self.domain_ce[i] / self.domain_tok[i])
                          for i, d in enumerate(domains) if self.domain_tok[i] > 0}
    out["domain_tokens"] = {d: int(self.domain_tok[i])
                            for i, d in enumerate(domains) if self.domain_tok[i] > 0}
    out["role_loss"] = {r: float(self.role_ce[i] / self.role_tok[i])
                        for i, r in enumerate(batch_lib.ROLES) if self.role_tok[i] > 0}
    return out
