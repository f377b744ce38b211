"""One writer per workdir, and the run's identity: the config it was started with and its history.

Lock (`run.lock`, JSON: pid, host, start time): taken by process 0 before a run writes
anything into its workdir, released when it ends (also on an exception). A second run in
the same workdir fails at its start with `WorkdirLockedError` naming the holder. While a
run lives, a thread touches the file every minute (its mtime is the heartbeat). A lock is
stale, and taken over with a log line, when its holder's pid is not running on this host
(or runs another process that reused the pid), or, for a holder on another host, when the
heartbeat is older than `train.lock_stale_minutes` (default 30; 0: never take over another
host's lock: remove the file by hand).

On a bucket (gs://) the lock is an object created with the store's create-only precondition
(GCS `ifGenerationMatch=0`: of two runs starting at once exactly one creates it), read back
to confirm the token, and its update time is the heartbeat (the object is rewritten). There
is no atomic rename there: taking over a stale lock deletes it after reading the same
holder twice, so two runs taking over one stale lock in the same second could both start.

Identity: `config.json` is the config the workdir's run was started with, written once;
`config_history.jsonl` has one line per invocation (time, the step it starts from, how it
started, what it changed). The recorded settings are config.json with every line's changes
laid over it. A resume whose settings differ outside `ALLOWED_CHANGES` stops before the
first step with `ConfigChangedError` listing `key: old -> new`, unless
`train.on_config_change='continue'`; either way the accepted changes and their step are in
the history (and in the run summary, `config_changes`). A workdir with a config.json but no
checkpoint starts from scratch: nothing of the earlier run survives, so its config.json is
replaced (history line `"started": true`). A key the recorded config lacks (added to the
schema later) counts as its default.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import socket
import threading
import time
from typing import Any, Mapping

import ml_collections

from cpt_jax import config as config_lib
from cpt_jax import paths

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
HEARTBEAT_SECONDS = 60.0

# Keys a resume may change without train.on_config_change='continue' (and why); the change
# is still recorded in config_history.jsonl. A key ending in '.*' covers its group.
ALLOWED_CHANGES = {
    "train.steps": "extension only (>= the recorded value; a decaying LR schedule is laid "
                   "over the new length)",
    "train.eval_every": "when to evaluate",
    "train.checkpoint_every": "when to save",
    "train.keep_checkpoints": "how many saves to keep",
    "train.async_checkpoints": "how to save",
    "train.progress_bar": "display",
    "train.peak_flops": "MFU's denominator only",
    "train.on_config_change": "this policy",
    "train.lock_stale_minutes": "the lock's policy",
    "replay.max_tflops": "the stage's hard cap (raising or lifting it lets a stopped stage "
                         "train on; budget.py)",
    "replay.max_seconds": "the stage's hard cap (as replay.max_tflops)",
    "sharding.mesh_shape": "elastic resume on another device count",
    "distributed.*": "where the processes run",
    "data.prefetch": "the same batches, produced ahead or not",
    "run_name": "a label",
}
# Allowed changes that can make a finished run train on (stages.py re-enters such a stage).
RESUMING_CHANGES = ("train.steps", "replay.max_tflops", "replay.max_seconds")


def log(msg: str) -> None:
  print(f"[cpt_jax] {msg}", flush=True)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------- lock


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir's lock."""


def _pid_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  return True


class WorkdirLock:
  """`<workdir>/run.lock`, held from `acquire` to `release` (also a context manager)."""

  def __init__(self, workdir: str, stale_minutes: float = 30.0):
    self.workdir = paths.absolute(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.remote = paths.is_remote(self.workdir)
    self.stale_minutes = float(stale_minutes)
    self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                 "pid_start": _pid_start(os.getpid()), "token": secrets.token_hex(8)}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (a stale one is taken over); raises WorkdirLockedError if held."""
    paths.as_path(self.workdir).mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      if not self._create():
        holder, age = self._read()
        if holder.get("released"):
          continue
        why = self.stale_reason(holder, age)
        if not why:
          mine = holder.get("pid") == os.getpid() and holder.get("host") == self.info["host"]
          raise WorkdirLockedError(
              f"{self.workdir} is in use by another run: {describe(holder)} (lock file "
              f"{self.path}, heartbeat {age:.0f} s ago). " + (
                  "That is this process: close the other Trainer first" if mine else
                  "Wait for it to end, or use another workdir; remove the lock file only if "
                  "that run is gone")) from None
        log(f"{self.workdir}: taking over a stale lock of {describe(holder)}: {why}")
        self._take_over(holder)
        continue
      self._thread = threading.Thread(target=self._heartbeat, name="cpt-workdir-lock",
                                      daemon=True)
      self._thread.start()
      return self
    raise WorkdirLockedError(f"{self.workdir}: another run took the lock {self.path} while "
                             "this one took over a stale one")

  def _create(self) -> bool:
    """Creates the lock file with this run's record; False if one exists."""
    if self.remote:  # check first: a store without preconditions would overwrite
      if paths.as_path(self.path).exists():
        return False
      return paths.create_new(self.path, json.dumps(self.info)) and self.held()
    return paths.create_new(self.path, json.dumps(self.info))

  def _read(self) -> tuple[dict, float]:
    """(the holder's record, {} if unreadable; seconds since its heartbeat)."""
    age = 0.0
    try:
      age = time.time() - paths.mtime(self.path)
      holder = json.loads(paths.as_path(self.path).read_text())
      valid = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder["pid"] > 0
      return (holder if valid else {}), age
    except FileNotFoundError:
      return {"released": True}, 0.0
    except (OSError, ValueError):
      return {}, age

  def stale_reason(self, holder: Mapping[str, Any], age: float) -> str:
    """Why the holder's lock is stale ('' while it may still be running)."""
    if "pid" not in holder:  # a holder dies between creating and writing the file
      return f"unreadable and {age:.0f} s old" if age > HEARTBEAT_SECONDS else ""
    pid = int(holder["pid"])
    if holder.get("host") == self.info["host"]:
      if not _running(pid):
        return f"pid {pid} is not running on this host"
      start = _pid_start(pid)
      if holder.get("pid_start") and start and start != holder["pid_start"]:
        return f"pid {pid} now belongs to another process"
      return ""
    if self.stale_minutes > 0 and age > self.stale_minutes * 60:
      return (f"no heartbeat for {age / 60:.0f} min from host {holder.get('host')} "
              f"(train.lock_stale_minutes={self.stale_minutes:g})")
    return ""

  def _take_over(self, holder: Mapping[str, Any]) -> None:
    """Moves the stale file aside (atomic); if a concurrent taker's fresh lock was moved
    instead, it is put back and the next attempt sees it. On a bucket: deleted if it still
    holds the same record."""
    if self.remote:
      again, _ = self._read()
      if again.get("token") == holder.get("token"):
        try:
          paths.as_path(self.path).unlink()
        except FileNotFoundError:
          pass
      return
    aside = f"{self.path}.stale-{self.info['token']}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    try:
      with open(aside, encoding="utf-8") as f:
        moved = json.load(f)
    except (OSError, ValueError):
      moved = {}
    if moved.get("token") is not None and moved.get("token") != holder.get("token"):
      try:
        os.link(aside, self.path)  # never over a lock created meanwhile
      except FileExistsError:
        pass
    os.remove(aside)

  def held(self) -> bool:
    holder, _ = self._read()
    return holder.get("token") == self.info["token"]

  def _heartbeat(self) -> None:
    interval = min(HEARTBEAT_SECONDS, max(1.0, self.stale_minutes * 60 / 4 or HEARTBEAT_SECONDS))
    while not self._stop.wait(interval):
      if not self.held():
        log(f"{self.workdir}: lost the workdir lock {self.path} (removed or taken over)")
        return
      try:
        if self.remote:  # the object's update time is the heartbeat
          paths.as_path(self.path).write_text(json.dumps(self.info))
        else:
          os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    """Stops the heartbeat and removes the file if it is still this run's (idempotent)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
      if self.held():
        paths.as_path(self.path).unlink()


def describe(holder: Mapping[str, Any]) -> str:
  if "pid" not in holder:
    return "an unknown run (unreadable lock file)"
  return f"pid {holder['pid']} on host {holder.get('host')} since {holder.get('started')}"


# ------------------------------------------------------------------------------ identity


class ConfigChangedError(ValueError):
  """A resume or staged rerun with settings other than the workdir's recorded ones."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def as_flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's keys as JSON values (what config.json holds), dotted."""
  return flatten(json.loads(config.to_json_best_effort()))


def allowed(key: str, old: Any, new: Any) -> bool:
  """Whether a resume may change `key` from `old` to `new` without 'continue'."""
  if key == "train.steps":
    return isinstance(old, (int, float)) and isinstance(new, (int, float)) and new >= old
  return key in ALLOWED_CHANGES or any(
      p.endswith(".*") and key.startswith(p[:-1]) for p in ALLOWED_CHANGES)


def fmt(v: Any) -> str:
  return json.dumps(v)


def _read_jsonl(path: str) -> list[dict]:
  if not paths.as_path(path).exists():
    return []
  out = []
  with paths.as_path(path).open("r") as f:
    for i, line in enumerate(f):
      if line.strip():
        try:
          out.append(json.loads(line))
        except ValueError as e:  # a line cut by a crash is the last one
          log(f"{path}: line {i + 1} is not JSON ({e}); ignored")
  return out


class RunIdentity:
  """The workdir's recorded settings against this invocation's (`check`), and the record
  of this invocation (`record`, process 0)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = paths.absolute(workdir)
    self.config_json = config.to_json_best_effort(indent=2)
    self.new = flatten(json.loads(self.config_json))
    self.policy = str(config.train.get("on_config_change", "stop"))
    self.history = _read_jsonl(os.path.join(self.workdir, HISTORY_FILE))
    self.fresh = True  # no checkpoint to resume (`check`)
    self.recorded = self._recorded()
    self.changes: dict[str, tuple[Any, Any]] = {}
    if self.recorded is not None:
      defaults = as_flat(config_lib.default_config())
      for key, new in self.new.items():
        old = self.recorded.get(key, defaults.get(key, None))
        if old != new and not (key not in self.recorded and key not in defaults):
          self.changes[key] = (old, new)
    self.blocking = [k for k, (o, n) in self.changes.items() if not allowed(k, o, n)]

  def _recorded(self) -> dict[str, Any] | None:
    """config.json with the changes of the history lines since it was written."""
    path = os.path.join(self.workdir, CONFIG_FILE)
    if not paths.as_path(path).exists():
      return None
    with paths.as_path(path).open("r") as f:
      try:
        flat = flatten(json.load(f))
      except ValueError as e:
        raise ConfigChangedError(f"{path} is not JSON ({e}): the workdir's recorded config is "
                                 "damaged; restore it or use another workdir") from None
    for line in self._since_started():
      for key, change in line.get("changes", {}).items():
        flat[key] = change["new"]
    return flat

  def _since_started(self) -> list[dict]:
    """The history lines after the one that wrote config.json."""
    since = max((i for i, h in enumerate(self.history) if h.get("started")), default=-1)
    return self.history[since + 1:]

  def check(self, resume_step: int | None, where: str = "") -> "RunIdentity":
    """Raises ConfigChangedError when a resume from `resume_step` (None: a fresh start)
    changes a key outside ALLOWED_CHANGES and the policy is 'stop'."""
    self.fresh = resume_step is None
    if resume_step is None or not self.blocking or self.policy == "continue":
      return self
    lines = [f"  {k}: {fmt(self.changes[k][0])} -> {fmt(self.changes[k][1])}"
             + (" (train.steps may only grow)" if k == "train.steps" else "")
             for k in self.blocking]
    raise ConfigChangedError(
        f"{where}{self.workdir} was run with other settings (config.json + "
        f"config_history.jsonl); resuming it from step {resume_step} would change:\n"
        + "\n".join(lines) + "\nRerun with the recorded settings, use another workdir, or set "
        "train.on_config_change=continue to accept the change (recorded with its step in "
        "config_history.jsonl and the summary)")

  def record(self, step: int, how: str) -> None:
    """Writes config.json on a fresh start and this invocation's history line."""
    line = {"time": _now(), "step": int(step), "init": how, "pid": os.getpid(),
            "host": socket.gethostname()}
    if self.recorded is None or self.fresh:
      if self.recorded is not None:
        log(f"{self.workdir}: no checkpoint to resume; config.json replaced by this run's "
            f"({len(self.changes)} keys differ; see {HISTORY_FILE})")
      paths.write_atomic(os.path.join(self.workdir, CONFIG_FILE), self.config_json)
      line["started"] = True
    if self.changes and line.get("started"):  # informational: the old run is gone
      line["replaced"] = {k: {"old": o, "new": n} for k, (o, n) in self.changes.items()}
    elif self.changes:
      line["changes"] = {k: {"old": o, "new": n, "by": "allow-list" if k not in self.blocking
                             else f"on_config_change={self.policy}"}
                         for k, (o, n) in self.changes.items()}
      log(f"{self.workdir}: settings changed from step {step}: " + "; ".join(
          f"{k}: {fmt(o)} -> {fmt(n)}" for k, (o, n) in self.changes.items()))
    paths.append_text(os.path.join(self.workdir, HISTORY_FILE), json.dumps(line) + "\n")
    self.history.append(line)

  def changes_made(self) -> list[dict]:
    """[{'step', 'time', 'changes': {key: {old, new, by}}}] of the run since config.json
    was written (for the summary and report.md)."""
    return [{"step": h["step"], "time": h["time"], "changes": h["changes"]}
            for h in self._since_started() if h.get("changes")]

