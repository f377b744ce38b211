"""Orbax checkpoints: the sharded TrainState plus JSON host state (data, mixer).

Orbax writes each step into a temporary folder and renames it when complete,
so a crash during a save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from cpt_jax import config as config_lib
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import tau as tau_lib
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


# ------------------------------------------------------------------ warm start from another run


def source_decomposition(directory: str) -> dict | None:
  """The `decomposition` group of the run that wrote `directory` (workdir or its
  checkpoints/), read from its config.json; None when it had none / no config.json."""
  directory = os.path.abspath(directory)
  for cand in (os.path.join(directory, "config.json"),
               os.path.join(os.path.dirname(directory), "config.json")):
    if os.path.isfile(cand):
      with open(cand, encoding="utf-8") as f:
        group = json.load(f).get("decomposition") or {}
      return group if group.get("mode") else None
  return None


def restore_merged_params(directory: str, abstract_model_params: Any, model_boxed: Any,
                          mesh: Any, rules: Any, step: int | None = None) -> Any:
  """Model params of another run's checkpoint, with its tau (if any) merged into sigma.

  A plain checkpoint is read exactly as `restore_params` does; a decomposed
  one (its run's config.json has `decomposition.mode`) is read as {'sigma', 'tau'} and
  merged, so a stage after a LoRA stage starts from the full model that stage ended with.
  """
  group = source_decomposition(directory)
  if group is None:
    return restore_params(directory, abstract_model_params, step)
  dc = config_lib.default_config().decomposition
  dc.update({k: v for k, v in group.items() if k in dc})
  src = tau_lib.build(dc, model_boxed)
  tau_sh = shd.logical_shardings(src.boxed(), mesh, rules)
  tau_abs = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         nn.unbox(src.boxed()), tau_sh)
  both = restore_params(directory, {"sigma": abstract_model_params, "tau": tau_abs}, step)
  out_sh = jax.tree.map(lambda s: s.sharding, abstract_model_params)
  return jax.jit(src.merge, out_shardings=out_sh)(both)
