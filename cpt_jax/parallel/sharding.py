"""Device mesh, logical axis rules and the shardings derived from them.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel
with parameters and optimizer state sharded) and `tensor` (model parallel over
heads / MLP / vocab). Parameters and activations carry logical axis names; the
rules in `config.sharding.logical_axis_rules` map them onto mesh axes.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 by the remaining devices; raises on a bad shape.

  Errors name the config key `sharding.mesh_shape`.
  """
  try:
    shape = [int(s) for s in mesh_shape]
  except (TypeError, ValueError, OverflowError):
    raise ValueError(f"sharding.mesh_shape={mesh_shape!r}: expected {len(MESH_AXES)} integers "
                     f"for axes {MESH_AXES}") from None
  if any(not isinstance(s, (int, np.integer)) and s != int(s) for s in mesh_shape):
    raise ValueError(f"sharding.mesh_shape={tuple(mesh_shape)}: entries must be integers")
  if len(shape) != len(MESH_AXES):
    raise ValueError(
        f"sharding.mesh_shape={tuple(mesh_shape)} must have {len(MESH_AXES)} entries "
        f"for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"sharding.mesh_shape={tuple(mesh_shape)}: at most one entry may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"sharding.mesh_shape={tuple(mesh_shape)}: entries must be positive or -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f"sharding.mesh_shape={tuple(mesh_shape)} does not fit {num_devices} devices: "
          f"{num_devices} is not divisible by {known}")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
        f"sharding.mesh_shape={tuple(mesh_shape)} needs {int(np.prod(shape))} devices, "
        f"but {num_devices} are available")
  return tuple(shape)


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all) with axes (data, fsdp, tensor)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except  # e.g. CPU devices lack topology
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Normalises config rules (tuples or lists from a ConfigDict) to tuples."""
  out = []
  for rule in rules:
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((str(name), axes))
  return tuple(out)


def data_parallel_size(mesh: Mesh) -> int:
  """How many row shards `batch_sharding` cuts a batch into (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batch arrays: leading (row) axis over data x fsdp."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global sharded arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
