"""Orbax checkpoints: the sharded TrainState plus JSON host state (data, mixer).

Orbax writes each step into a temporary folder and renames it when complete,
so a crash during a save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cpt_jax.train.state import TrainState


def _state_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "frozen": state.frozen}


def _from_tree(tree: dict) -> TrainState:
  return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                    frozen=tree.get("frozen") or {})


class Checkpointer:
  """Saves every N steps and at the end, keeps the last k, restores the latest."""

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
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

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """Reads only the params of another run's checkpoint (warm start).

  `directory` is that run's checkpoint folder (`<workdir>/checkpoints`) or its
  workdir. Params land in `abstract_params`' shardings; the other run's
  optimizer state is never read.
  """
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"train.init_checkpoint: no checkpoint folder at {directory}")
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0),
      item_names=("state", "host"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"train.init_checkpoint: {directory} holds no finished checkpoint")
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
      abstract_params)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": abstract_params}, restore_args={"params": restore_args},
      partial_restore=True)))
  mngr.close()
  return out["state"]["params"]
