"""The tau tree: a per-stage delta on some leaves of the model's params (sigma).

  mode='lora'     tau[path] = {'lora_a': A [in..., r], 'lora_b': B [r, out...]} for every
                  leaf whose path (e.g. 'layers_0/attn/q/kernel') matches
                  `decomposition.targets`; delta = (alpha / r) * A @ B, B = 0 at init,
                  A ~ N(0, 1/fan_in). Input axes: all but the last for kernels that write
                  into the residual stream (logical name 'embed' last, e.g. attn/o
                  [H, E, D]), else the first. Stacked (scan_layers) kernels keep their
                  leading 'layers' axis on A and B.
  mode='subtree'  tau[path] = a full-shape delta (zeros at init) for every leaf whose path
                  matches `targets`; those leaves of sigma are frozen (no gradient use, no
                  optimizer state), so the sub-trees train only through tau.

  model params W = sigma + delta(tau)          (`Tau.merge`; pure, used for eval and export)

For the routed train step (train/decomposition.py) `Tau.with_adapters` gives the model
tree the other way: sigma's kernels unchanged, A and scale * B (LoRA) or the delta
(subtree) beside each targeted kernel (the model adds (x A) (scale B), or x delta, to
x W: model/transformer.py's Dense), and the [B] mask of the rows whose cotangents train
tau. Only tau entries on Dense kernels can run so (`Tau.on_kernels_only`); entries on other
leaves (norm scales, embeddings, biases) are merged.

Keeping tau a *delta* on a full sigma makes three things trivial: B = 0 / delta = 0 leaves
the model unchanged, "the model without this stage's tau" is sigma itself, and export is
`merge` (a plain model tree for `save_hf`). How tau trains is decomposition.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax.model import transformer
from cpt_jax.schema.decomposition import MODES


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def path_str(path) -> str:
  """'layers_0/attn/q/kernel' from a jax key path."""
  return "/".join(_key_name(k) for k in path)


def path_keys(path) -> tuple[str, ...]:
  """('layers_0', 'attn', 'q', 'kernel') from a jax key path."""
  return tuple(_key_name(k) for k in path)


def _set_nested(tree: dict, keys: tuple[str, ...], value: Any) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def _get_nested(tree: Any, keys: tuple[str, ...]) -> Any:
  for k in keys:
    tree = tree[k]
  return tree


@dataclasses.dataclass(frozen=True)
class TauSpec:
  """One tau entry: the sigma leaf it modifies and (LoRA) how its axes split."""

  keys: tuple[str, ...]  # path of the sigma leaf
  shape: tuple[int, ...]  # sigma leaf shape
  names: tuple[Any, ...] | None  # logical axis names of the sigma leaf
  stacked: bool  # leading 'layers' axis (scan_layers)
  in_ndim: int  # LoRA: number of input axes (after the layers axis)


@dataclasses.dataclass(frozen=True)
class Tau:
  """The static description of a run's tau tree (built by `build`)."""

  mode: str
  targets: str
  rank: int
  alpha: float
  specs: tuple[TauSpec, ...]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def boxed(self) -> dict:
    """Shape-only tau with logical-axis boxes (for shardings)."""
    out: dict = {}
    for s in self.specs:
      if self.mode == "subtree":
        leaf = _box(jax.ShapeDtypeStruct(s.shape, jnp.float32), s.names)
      else:
        a_shape, b_shape, a_names, b_names = self._lora_shapes(s)
        leaf = {"lora_a": _box(jax.ShapeDtypeStruct(a_shape, jnp.float32), a_names),
                "lora_b": _box(jax.ShapeDtypeStruct(b_shape, jnp.float32), b_names)}
      _set_nested(out, s.keys, leaf)
    return out

  def _lora_shapes(self, s: TauSpec):
    lead = s.shape[:1] if s.stacked else ()
    core = s.shape[1:] if s.stacked else s.shape
    a_shape = lead + core[:s.in_ndim] + (self.rank,)
    b_shape = lead + (self.rank,) + core[s.in_ndim:]
    if s.names is None:
      return a_shape, b_shape, None, None
    nl = s.names[:1] if s.stacked else ()
    nc = s.names[1:] if s.stacked else s.names
    return (a_shape, b_shape, nl + tuple(nc[:s.in_ndim]) + ("lora_rank",),
            nl + ("lora_rank",) + tuple(nc[s.in_ndim:]))

  def init(self, rng: jax.Array) -> dict:
    """A fresh tau: B = 0 and A ~ N(0, 1/fan_in) (LoRA), or zero deltas (subtree)."""
    out: dict = {}
    for i, s in enumerate(self.specs):
      if self.mode == "subtree":
        leaf = jnp.zeros(s.shape, jnp.float32)
      else:
        a_shape, b_shape, _, _ = self._lora_shapes(s)
        fan_in = int(np.prod(s.shape[1 if s.stacked else 0:][:s.in_ndim]))
        a = jax.random.normal(jax.random.fold_in(rng, i), a_shape, jnp.float32)
        leaf = {"lora_a": a / math.sqrt(fan_in), "lora_b": jnp.zeros(b_shape, jnp.float32)}
      _set_nested(out, s.keys, leaf)
    return out

  def delta(self, tau_leaf: Any, sigma_leaf: jax.Array) -> jax.Array:
    if self.mode == "subtree":
      return tau_leaf
    return lora_delta(tau_leaf["lora_a"], tau_leaf["lora_b"], self.scale, sigma_leaf.ndim)

  def merge(self, both: dict) -> Any:
    """Model params W = sigma + delta(tau) from {'sigma', 'tau'} (pure and jit-safe)."""
    out = jax.tree.map(lambda x: x, both["sigma"])  # shallow copy of the dict structure
    for s in self.specs:
      w = _get_nested(both["sigma"], s.keys)
      d = self.delta(_get_nested(both["tau"], s.keys), w)
      _set_nested(out, s.keys, (w + d.astype(w.dtype)))
    return out

  @property
  def on_kernels_only(self) -> bool:
    """Every entry sits on a Dense kernel (a LoRA adapter or a subtree delta), so it can be
    a side branch of that kernel's matmul."""
    return all(s.keys[-1] == "kernel" for s in self.specs)

  def with_adapters(self, both: dict, adapter_rows_B: jax.Array) -> Any:
    """The model tree with tau as side branches (needs `on_kernels_only`): sigma's leaves,
    plus lora_a = A and lora_b = scale * B (LoRA) or `delta` (subtree) beside each
    targeted kernel, and the top-level [B] mask of the rows whose cotangents train them
    (model/transformer.py)."""
    if not self.on_kernels_only:
      raise ValueError(f"decomposition.targets={self.targets!r} (mode {self.mode!r}) has "
                       "entries on leaves other than Dense kernels")
    out = jax.tree.map(lambda x: x, both["sigma"])  # shallow copy of the dict structure
    for s in self.specs:
      t = _get_nested(both["tau"], s.keys)
      if self.mode == "subtree":
        _set_nested(out, s.keys[:-1] + (transformer.DELTA,), t)
      else:
        _set_nested(out, s.keys[:-1] + ("lora_a",), t["lora_a"])
        _set_nested(out, s.keys[:-1] + ("lora_b",), self.scale * t["lora_b"])
    out[transformer.ADAPTER_ROWS] = adapter_rows_B
    return out

  def frozen_base(self) -> set[tuple[str, ...]]:
    """Paths of the sigma leaves that train only through tau (subtree mode)."""
    return {s.keys for s in self.specs} if self.mode == "subtree" else set()

  def sigma_labels(self, sigma: Any) -> Any:
    """'train' / 'frozen' per sigma leaf (for optax.multi_transform)."""
    frozen = self.frozen_base()
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if path_keys(p) in frozen else "train", sigma)


def _box(value, names):
  return value if names is None else nn.Partitioned(value, names=tuple(names))


def lora_delta(a: jax.Array, b: jax.Array, scale: float, w_ndim: int) -> jax.Array:
  """scale * A @ B over the rank axis: A [(Ly,) in..., r], B [(Ly,) r, out...]."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  if a.ndim + b.ndim - 2 == w_ndim:
    return scale * jnp.tensordot(a, b, axes=1)
  return scale * jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)  # stacked layers


def _lora_in_ndim(names, stacked: bool, ndim: int) -> int:
  core = (names[1:] if stacked else names) if names is not None else None
  core_ndim = ndim - (1 if stacked else 0)
  if core is not None and core_ndim >= 2 and core[-1] == "embed":
    return core_ndim - 1  # writes into the residual stream: every other axis is input
  return 1


def build(dc: Any, model_boxed: Any) -> Tau:
  """The tau tree `dc` (a `decomposition` config group with a mode) asks for."""
  if dc.mode not in MODES:
    raise ValueError(f"decomposition.mode={dc.mode!r}; expected one of {MODES}")
  pattern = re.compile(dc.targets)
  specs = []
  flat, _ = jax.tree_util.tree_flatten_with_path(
      model_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in flat:
    name = path_str(path)
    if not pattern.search(name):
      continue
    names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    shape = tuple(value.shape)
    stacked = bool(names) and names[0] == "layers"
    if dc.mode == "lora" and len(shape) - int(stacked) < 2:
      raise ValueError(f"decomposition.targets={dc.targets!r} matches {name} {shape}, which is "
                       "not a matrix; LoRA needs kernels (e.g. 'attn/(q|v)/kernel')")
    specs.append(TauSpec(path_keys(path), shape, names, stacked,
                         _lora_in_ndim(names, stacked, len(shape))))
  if not specs:
    raise ValueError(f"decomposition.targets={dc.targets!r} matches no parameter path")
  if dc.mode == "lora" and dc.lora_rank < 1:
    raise ValueError(f"decomposition.lora_rank={dc.lora_rank} must be >= 1")
  return Tau(mode=dc.mode, targets=dc.targets, rank=int(dc.lora_rank),
             alpha=float(dc.lora_alpha), specs=tuple(specs))
