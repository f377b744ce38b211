"""Orbax checkpoints: the sharded TrainState plus JSON host state (data, mixer).

Orbax writes each step into a temporary folder and renames it when complete,
so a crash during a save leaves the previous checkpoint usable.

A step folder holds `_CHECKPOINT_METADATA`, `host/metadata` (the host state, JSON) and
`state/` (`_METADATA`: the tree, JSON; `manifest.ocdbt` and `ocdbt.process_*/d/*`: the
arrays' OCDBT database). A resume restores the newest step that reads back
(`Checkpointer.restore_newest_intact`): a newer one that does not (a truncated or
deleted file, an empty folder) is named with the file and the reason (`diagnose`) and
moved to `<checkpoints>/damaged/<step>-<tag>`, never deleted, so Orbax no longer lists it.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from cpt_jax import config as config_lib
from cpt_jax import paths
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import tau as tau_lib
from cpt_jax.train.state import TrainState


def _state_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "frozen": state.frozen}


def _from_tree(tree: dict) -> TrainState:
  return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                    frozen=tree.get("frozen") or {})


DAMAGED = "damaged"  # <checkpoints>/damaged/<step>-<tag>: steps set aside, never deleted
# A TensorStore read error: the array's key, its OCDBT database folder and the reason.
_ARRAY_ERROR = re.compile(r'"(?P<key>[^"]+)" in OCDBT database at local file "(?P<db>[^"]+)"'
                          r':? ?(?P<why>[^\n]*?)(?: \[tensorstore_spec|\n|$)')


class RestoreError(RuntimeError):
  """No step of a checkpoint folder restores; the message names each step's failure."""


def diagnose(step_dir: str, error: BaseException) -> tuple[str, str]:
  """(tag, why) the step folder `step_dir` did not restore with `error`, naming the file.

  Looks for what the files Orbax writes lack (an empty folder, a missing item, a
  missing or non-JSON metadata file, no array database), then for the array the
  error chain could not read; else the error's first line.
  """
  folder = paths.as_path(step_dir)
  if not folder.is_dir():
    return "missing", f"the step folder {step_dir} is missing"
  if not any(True for _ in folder.iterdir()):
    return "empty", f"the step folder {step_dir} is empty"
  for item in ("state", "host"):
    if not (folder / item).is_dir():
      return f"no-{item}", f"its item '{item}' is missing: no folder {step_dir}/{item}"
  for name in ("host/metadata", "state/_METADATA", "state/manifest.ocdbt"):
    path = os.path.join(step_dir, name)
    if not (folder / name).is_file():
      return "missing-file", f"{path} is missing"
    if not name.endswith(".ocdbt"):
      try:
        json.loads((folder / name).read_text())
      except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return "bad-json", f"{path} is not valid JSON ({e})"
  cause, seen = error, 0
  while cause is not None and seen < 20:
    m = _ARRAY_ERROR.search(str(cause))
    if m:
      size = re.search(r"value of size (\d+)", m["why"])  # a truncated data file: which one
      files = [p for p in glob.glob(os.path.join(m["db"], "**", "d", "*"), recursive=True)
               if size and os.path.getsize(p) == int(size[1])]  # a local database
      where = f" (data file {files[0]})" if len(files) == 1 else ""
      return "bad-array", (f"array {m['key']} in the database {m['db']} does not read: "
                           f"{m['why'].strip()}{where}")
    cause, seen = cause.__cause__ or cause.__context__, seen + 1
  lines = str(error).strip().splitlines() or [""]
  return "unreadable", f"{type(error).__name__}: {lines[0][:300]}"


class Checkpointer:
  """Saves every N steps and at the end, keeps the last k, restores the newest intact."""

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
    self.directory = paths.absolute(directory)  # a gs:// folder stays a URI
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        item_names=("state", "host"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: TrainState, host: dict[str, Any]) -> None:
    """Starts a save (async by default) of state + JSON-serialisable host state."""
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(state)),
        host=ocp.args.JsonSave(host)), force=True)

  def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    """Restores (state, host) at `step` (default latest) into `abstract`'s shardings."""
    step = self.latest_step() if step is None else step
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_state_tree(abstract)),
        host=ocp.args.JsonRestore()))
    return _from_tree(out["state"]), dict(out["host"])

  def restore_newest_intact(self, abstract: TrainState) -> tuple[TrainState, dict, list[str]]:
    """Restores the newest step that reads back; returns (state, host, notes).

    Every newer step is moved aside (`set_aside`) with a note naming its file and the
    reason. When no step restores, nothing is moved (the files may be intact and the
    run's model or layout changed) and RestoreError names each step's failure.
    """
    failed = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, host = self.restore(abstract, step)
      except Exception as e:  # pylint: disable=broad-except  # damage shows as many types
        failed.append((step, *diagnose(self.step_dir(step), e), e))
        continue
      notes = [f"checkpoint step {s} does not restore: {why}; moved to "
               f"{self.set_aside(s, tag, why)}; resuming from step {step}"
               for s, tag, why, _ in failed]
      return state, host, notes
    if not failed:
      raise RestoreError(f"{self.directory} holds no checkpoint")
    raise RestoreError(
        f"no checkpoint in {self.directory} restores, so the run does not start over: "
        + "; ".join(f"step {s}: {why}" for s, _, why, _ in failed)
        + ". Damaged steps can be moved away (a run with no step starts afresh); a changed "
        "model or parameter layout needs the run's own config") from failed[0][3]

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def set_aside(self, step: int, tag: str, why: str) -> str:
    """Moves step `step` to `<dir>/damaged/<step>-<tag>` (never deleted; Orbax no longer
    lists it), with `why` in `<step>-<tag>.txt` beside it; returns the new path."""
    base = os.path.join(self.directory, DAMAGED, f"{step}-{tag}")
    dst, n = base, 1
    while paths.as_path(dst).exists():
      n += 1
      dst = f"{base}.{n}"
    if jax.process_index() == 0:
      paths.as_path(dst).parent.mkdir(parents=True, exist_ok=True)
      paths.move(self.step_dir(step), dst)
      paths.write_atomic(dst + ".txt", f"step {step}: {why}\n")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"cpt_jax set aside {step}")
    self._mngr.reload()
    return dst

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def restore_params(directory: str, abstract_params: Any, step: int | None = None,
                   model_config: Any = None, source: str = "train.init_checkpoint") -> Any:
  """Reads only the params of another run's checkpoint (warm start).

  `directory` is that run's checkpoint folder (`<workdir>/checkpoints`) or its
  workdir. Params land in `abstract_params`' shardings; the other run's
  optimizer state is never read. Their tree and shapes are checked first
  (`check_params_fit`, naming paths and the `model_config` keys that disagree).
  """
  directory = paths.absolute(directory)
  if paths.as_path(directory, "checkpoints").is_dir():
    directory = os.path.join(directory, "checkpoints")
  if not paths.as_path(directory).is_dir():
    raise FileNotFoundError(f"{source}: no checkpoint folder at {directory}")
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0),
      item_names=("state", "host"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{source}: {directory} holds no finished checkpoint")
  check_params_fit(os.path.join(directory, str(step)), abstract_params, model_config, source)
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
      abstract_params)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": abstract_params}, restore_args={"params": restore_args},
      partial_restore=True)))
  mngr.close()
  return out["state"]["params"]


# ------------------------------------------------------------------ warm start from another run


class ParamsMismatchError(ValueError):
  """A warm-start checkpoint's params do not fit the model config: the message names the
  parameter paths, both shapes and the config keys that disagree."""


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def stored_param_shapes(step_dir: str) -> dict[str, tuple[int, ...]]:
  """{param path: shape} of the `params` a step folder holds, from its metadata (no array
  is read)."""
  meta = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state"))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  params = tree.get("params") if hasattr(tree, "get") else None
  if params is None:
    raise ParamsMismatchError(f"{step_dir}/state holds no 'params' tree")
  return {_path_str(p): tuple(leaf.shape) for p, leaf
          in jax.tree_util.tree_flatten_with_path(params)[0] if hasattr(leaf, "shape")}


def _source_config(directory: str) -> dict | None:
  """The config.json of the run that wrote `directory` (workdir or its checkpoints/)."""
  directory = paths.as_path(directory)
  for cand in (directory / "config.json", directory.parent / "config.json"):
    if cand.is_file():
      try:
        return json.loads(cand.read_text())
      except ValueError:
        return None
  return None


def _keys_behind(model_config: Any, source: dict | None, dims: set[int]) -> list[str]:
  """The `model.*` keys that explain a shape mismatch: those that differ from the source
  run's config.json, else those whose value is one of the requested sizes `dims`."""
  if model_config is None:
    return []
  mine = dict(model_config.items()) if hasattr(model_config, "items") else {}
  theirs = (source or {}).get("model") or {}
  if theirs:
    return [f"model.{k}={mine[k]!r} (the checkpoint's run: {theirs[k]!r})"
            for k in sorted(mine) if k in theirs and mine[k] != theirs[k]
            and not isinstance(mine[k], (list, tuple))]
  out = []
  for k in sorted(mine):
    v = mine[k]
    if isinstance(v, int) and not isinstance(v, bool) and v in dims:
      out.append(f"model.{k}={v}")
  pad = mine.get("vocab_pad_multiple") or 0
  if pad and mine.get("vocab_size") and -(-mine["vocab_size"] // pad) * pad in dims:
    out.append(f"model.vocab_size={mine['vocab_size']} (padded to a multiple of "
               f"model.vocab_pad_multiple={pad})")
  return out


def check_params_fit(step_dir: str, abstract_params: Any, model_config: Any = None,
                     source: str = "train.init_checkpoint") -> None:
  """ParamsMismatchError when the params stored in `step_dir` are not the tree and shapes of
  `abstract_params` (the model config's): names each parameter path with both shapes (up to
  five), what is missing or extra, and the model config keys that disagree."""
  want = {_path_str(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  got = stored_param_shapes(step_dir)
  bad = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]]
  missing = [k for k in want if k not in got]
  extra = [k for k in got if k not in want]
  if not (bad or missing or extra):
    return
  parts = [f"params/{k}: the checkpoint has shape {g}, the model config asks for {w}"
           for k, g, w in bad[:5]]
  if len(bad) > 5:
    parts.append(f"{len(bad) - 5} more shapes differ")
  if missing:
    parts.append(f"not in the checkpoint: {', '.join(missing[:5])}"
                 + (f" (+{len(missing) - 5})" if len(missing) > 5 else ""))
  if extra:
    parts.append(f"in the checkpoint, not in the model: {', '.join(extra[:5])}"
                 + (f" (+{len(extra) - 5})" if len(extra) > 5 else ""))
  dims = {d for _, g, w in bad for d, e in zip(w, g) if d != e} | (
      {d for _, g, w in bad if len(g) != len(w) for d in w})
  keys = _keys_behind(model_config, _source_config(os.path.dirname(step_dir)), dims)
  raise ParamsMismatchError(
      f"{source}: the params of {step_dir} do not fit the model config: "
      + "; ".join(parts)
      + (f". Config keys that disagree: {', '.join(keys)}" if keys else
         ". Set config.model as in the run that wrote the checkpoint"))


def source_decomposition(directory: str) -> dict | None:
  """The `decomposition` group of the run that wrote `directory` (workdir or its
  checkpoints/), read from its config.json; None when it had none / no config.json."""
  group = (_source_config(directory) or {}).get("decomposition") or {}
  return group if group.get("mode") else None


def restore_merged_params(directory: str, abstract_model_params: Any, model_boxed: Any,
                          mesh: Any, rules: Any, step: int | None = None,
                          model_config: Any = None,
                          source: str = "train.init_checkpoint") -> Any:
  """Model params of another run's checkpoint, with its tau (if any) merged into sigma.

  `source`: the config key or flag that named `directory`, for errors.

  A plain checkpoint is read exactly as `restore_params` does; a decomposed
  one (its run's config.json has `decomposition.mode`) is read as {'sigma', 'tau'} and
  merged, so a stage after a LoRA stage starts from the full model that stage ended with.
  """
  group = source_decomposition(directory)
  if group is None:
    return restore_params(directory, abstract_model_params, step, model_config, source)
  dc = config_lib.default_config().decomposition
  dc.update({k: v for k, v in group.items() if k in dc})
  src = tau_lib.build(dc, model_boxed)
  tau_sh = shd.logical_shardings(src.boxed(), mesh, rules)
  tau_abs = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         nn.unbox(src.boxed()), tau_sh)
  both = restore_params(directory, {"sigma": abstract_model_params, "tau": tau_abs}, step,
                        model_config, source)
  out_sh = jax.tree.map(lambda s: s.sharding, abstract_model_params)
  return jax.jit(src.merge, out_shardings=out_sh)(both)
