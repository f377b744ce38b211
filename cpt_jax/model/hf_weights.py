"""Hugging Face safetensors weights <-> cpt_jax parameter trees.

Names and layouts (HF `nn.Linear` weights are [out, in]):
  model.embed_tokens.weight [V, D]      <-> embed/embedding [Vp, D] (rows padded)
  layers.i.self_attn.q_proj.weight [H*E, D] <-> attn/q/kernel [D, H, E] (k, v alike)
  layers.i.self_attn.q_proj.bias [H*E]  <-> attn/q/bias [H, E]
  layers.i.self_attn.o_proj.weight [D, H*E] <-> attn/o/kernel [H, E, D]
  layers.i.mlp.{gate,up,down}_proj.weight <-> mlp/{gate,up,down}/kernel (transposed)
  layers.i.{input,post_attention}_layernorm.weight <-> {attn,mlp}_norm/scale
  model.norm.weight <-> final_norm/scale;  lm_head.weight [V, D] <-> lm_head/kernel [D, Vp]
With `scan_layers` the layer leaves are stacked under `layers` on a leading axis.

Only safetensors are read (nothing is unpickled). Loading goes one tensor at a
time; with shardings each device's slice is cut by `jax.make_array_from_callback`,
so a host never holds more than one (layer's) tensor beyond its own shards.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from cpt_jax import paths
from cpt_jax.model.transformer import ModelConfig, Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
LAYER_NAMES = {  # our path inside a layer -> HF name inside `model.layers.{i}.`
    ("attn", "q", "kernel"): "self_attn.q_proj.weight",
    ("attn", "k", "kernel"): "self_attn.k_proj.weight",
    ("attn", "v", "kernel"): "self_attn.v_proj.weight",
    ("attn", "q", "bias"): "self_attn.q_proj.bias",
    ("attn", "k", "bias"): "self_attn.k_proj.bias",
    ("attn", "v", "bias"): "self_attn.v_proj.bias",
    ("attn", "o", "kernel"): "self_attn.o_proj.weight",
    ("mlp", "gate", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "up", "kernel"): "mlp.up_proj.weight",
    ("mlp", "down", "kernel"): "mlp.down_proj.weight",
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",
}
TOP_NAMES = {
    ("embed", "embedding"): "model.embed_tokens.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("lm_head", "kernel"): "lm_head.weight",
}


# ---------------------------------------------------------------- layouts


def _layout(path: tuple[str, ...]) -> str:
  if path[-1] in ("scale", "bias"):
    return "flat"
  if path[0] == "embed":
    return "vocab_rows"
  if path[0] == "lm_head":
    return "vocab_cols"
  if path[-2] == "o":
    return "out"
  return "in"


def hf_shape(layout: str, shape: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
  """The HF tensor shape for one of our (per-layer) leaf shapes."""
  if layout == "flat":
    return (math.prod(shape),)
  if layout == "vocab_rows":
    return (vocab_size, shape[1])
  if layout == "vocab_cols":
    return (vocab_size, shape[0])
  if layout == "out":
    return (shape[-1], math.prod(shape[:-1]))
  return (math.prod(shape[1:]), shape[0])


def to_ours(layout: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """HF tensor -> our leaf of `shape` (vocab tables zero-padded)."""
  if layout == "flat":
    return w.reshape(shape)
  if layout == "vocab_rows":
    return np.pad(w, ((0, shape[0] - w.shape[0]), (0, 0)))
  if layout == "vocab_cols":
    return np.pad(w.T, ((0, 0), (0, shape[1] - w.shape[0])))
  return np.ascontiguousarray(w.T).reshape(shape)


def to_hf(layout: str, x: np.ndarray, vocab_size: int) -> np.ndarray:
  """Our leaf -> HF tensor (vocab padding dropped)."""
  if layout == "flat":
    return x.reshape(-1)
  if layout == "vocab_rows":
    return x[:vocab_size]
  if layout == "vocab_cols":
    return np.ascontiguousarray(x[:, :vocab_size].T)
  if layout == "out":
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
  return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


# ---------------------------------------------------------------- tree plan


def abstract_params(model_cfg: ModelConfig) -> Any:
  """ShapeDtypeStructs of the model's params (no logical boxes)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda t: Transformer(model_cfg).init(jax.random.key(0), t), tokens)
  return nn.unbox(boxed["params"])


def _path_names(key_path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def leaf_plan(model_cfg: ModelConfig, tree: Any) -> list[tuple[tuple[str, ...], str, list[str]]]:
  """For each leaf of `tree` (param-shaped): (path, layout, HF names per layer or [name])."""
  plan = []
  for key_path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = _path_names(key_path)
    if path in TOP_NAMES:
      plan.append((path, _layout(path), [TOP_NAMES[path]]))
    elif path[0] == "layers" and model_cfg.scan_layers:
      names = [f"model.layers.{i}.{LAYER_NAMES[path[1:]]}" for i in range(model_cfg.num_layers)]
      plan.append((path, _layout(path[1:]), names))
    elif path[0].startswith("layers_"):
      i = int(path[0].split("_")[1])
      plan.append((path, _layout(path[1:]), [f"model.layers.{i}.{LAYER_NAMES[path[1:]]}"]))
    else:
      raise ValueError(f"parameter {'/'.join(path)} has no Hugging Face equivalent")
  return plan


def stacked(path: tuple[str, ...], model_cfg: ModelConfig) -> bool:
  return model_cfg.scan_layers and path[0] == "layers"


# ---------------------------------------------------------------- reading


class SafetensorsFolder:
  """Tensor name -> shard file of a model folder; reads tensors as numpy."""

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._safe_open = safe_open
    if paths.is_remote(path) and not paths.as_path(path).is_dir():
      raise FileNotFoundError(f"init_from_hf: {path} is not a folder")
    self.path = paths.local_copy(path)  # safetensors maps local files: a bucket's is copied
    self._handles: dict[str, Any] = {}
    self.files = self._weight_map()

  def _weight_map(self) -> dict[str, str]:
    if not os.path.isdir(self.path):
      raise FileNotFoundError(f"init_from_hf: {self.path} is not a folder")
    index = os.path.join(self.path, INDEX_FILE)
    if os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      missing = sorted({f for f in weight_map.values()
                        if not os.path.isfile(os.path.join(self.path, f))})
      if missing:
        names = sorted(n for n, f in weight_map.items() if f == missing[0])
        raise FileNotFoundError(
            f"{index} lists shard {missing[0]!r} (holding {names[0]!r} and "
            f"{len(names) - 1} more tensors) but the file is missing; all missing: {missing}")
      return dict(weight_map)
    files = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
    if not files:
      pickled = sorted(os.path.basename(f) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")
                       for f in glob.glob(os.path.join(self.path, pattern)))
      if pickled:
        raise ValueError(
            f"{self.path} holds only pickled PyTorch weights {pickled}; cpt_jax reads "
            f"safetensors only and never unpickles. Convert once in a trusted environment: "
            f"python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained("
            f"'{self.path}').save_pretrained('OUT_DIR', safe_serialization=True)\" "
            f"(then copy the tokenizer files) and point init_from_hf at OUT_DIR")
      raise FileNotFoundError(f"{self.path}: no *.safetensors weights (nor {INDEX_FILE})")
    weight_map = {}
    for file in files:
      for name in self._handle(os.path.basename(file)).keys():
        weight_map[name] = os.path.basename(file)
    return weight_map

  def _handle(self, file: str):
    if file not in self._handles:
      self._handles[file] = self._safe_open(os.path.join(self.path, file), framework="numpy")
    return self._handles[file]

  def get(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
    """The tensor `name` as float32; raises naming it when absent or mis-shaped."""
    if name not in self.files:
      hint = (" (tied embeddings? see tie_word_embeddings / model.tie_embeddings)"
              if name == "lm_head.weight" else "")
      raise KeyError(f"{self.path}: tensor {name!r} not found in the checkpoint{hint}")
    handle = self._handle(self.files[name])
    shape = tuple(handle.get_slice(name).get_shape())
    if shape != tuple(expected_shape):
      raise ValueError(f"{self.path}/{self.files[name]}: tensor {name!r} has shape {shape}, "
                       f"the model config expects {tuple(expected_shape)}")
    return np.asarray(handle.get_tensor(name), dtype=np.float32)


def _leaf_reader(folder: SafetensorsFolder, layout: str, names: list[str],
                 layer_shape: tuple[int, ...], vocab_size: int) -> Callable[[int], np.ndarray]:
  """Layer i -> our converted per-layer array (the last one read is cached)."""
  cache: dict[int, np.ndarray] = {}

  def read(i: int) -> np.ndarray:
    if i not in cache:
      cache.clear()
      w = folder.get(names[i], hf_shape(layout, layer_shape, vocab_size))
      cache[i] = to_ours(layout, w, layer_shape)
    return cache[i]

  return read


def check_unused(folder: SafetensorsFolder, plan, model_cfg: ModelConfig) -> None:
  """Raises naming an HF tensor the model has no place for (e.g. an unexpected bias)."""
  used = {n for _, _, names in plan for n in names}
  if model_cfg.tie_embeddings:
    used.add("lm_head.weight")  # tied copies are dropped
  extra = sorted(n for n in folder.files
                 if n not in used and not n.endswith(IGNORED_SUFFIXES))
  if extra:
    raise ValueError(f"{folder.path}: tensor {extra[0]!r} has no place in the model "
                     f"(config mismatch?); unused: {extra[:8]}{'...' if len(extra) > 8 else ''}")


def load_hf_params(path: str, model_cfg: ModelConfig, shardings: Any = None) -> Any:
  """Parameters of the HF model folder `path`, laid out for `model_cfg`.

  `shardings`: a tree of `jax.sharding.Sharding` matching the params; each
  device then receives only its slice. Without it, arrays go to the default
  device. Values are float32 (bf16 checkpoints are widened exactly).
  """
  target = abstract_params(model_cfg)
  plan = leaf_plan(model_cfg, target)
  folder = SafetensorsFolder(path)
  check_unused(folder, plan, model_cfg)
  leaves, treedef = jax.tree_util.tree_flatten(target)
  sh_leaves = (treedef.flatten_up_to(shardings) if shardings is not None
               else [None] * len(leaves))
  out = []
  for (path_, layout, names), leaf, sharding in zip(plan, leaves, sh_leaves):
    is_stacked = stacked(path_, model_cfg)
    layer_shape = tuple(leaf.shape[1:] if is_stacked else leaf.shape)
    read = _leaf_reader(folder, layout, names, layer_shape, model_cfg.vocab_size)
    if sharding is None:
      full = np.stack([read(i) for i in range(len(names))]) if is_stacked else read(0)
      out.append(jnp.asarray(full))
      continue

    def callback(index, read=read, is_stacked=is_stacked, n=len(names)):
      if not is_stacked:
        return read(0)[index]
      layers = range(n)[index[0]]
      return np.stack([read(i)[index[1:]] for i in layers])

    out.append(jax.make_array_from_callback(tuple(leaf.shape), sharding, callback))
  return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------- writing


def _host_array(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), dtype=np.float32)


def hf_tensors(params: Any, model_cfg: ModelConfig) -> list[tuple[str, Callable, tuple]]:
  """(HF name, thunk -> float32 numpy tensor, HF shape) for every tensor, in HF order."""
  plan = leaf_plan(model_cfg, params)
  leaves = jax.tree_util.tree_leaves(params)
  gathered: dict[int, np.ndarray] = {}  # the last leaf fetched to host

  def host_leaf(j: int) -> np.ndarray:
    if j not in gathered:
      gathered.clear()
      gathered[j] = _host_array(leaves[j])
    return gathered[j]

  items = []
  for j, ((path_, layout, names), leaf) in enumerate(zip(plan, leaves)):
    is_stacked = stacked(path_, model_cfg)
    layer_shape = tuple(leaf.shape[1:] if is_stacked else leaf.shape)
    shape = hf_shape(layout, layer_shape, model_cfg.vocab_size)
    for i, name in enumerate(names):
      def thunk(j=j, i=i, is_stacked=is_stacked, layout=layout):
        x = host_leaf(j)
        return to_hf(layout, x[i] if is_stacked else x, model_cfg.vocab_size)
      items.append((name, thunk, shape))

  def order(name: str):
    if name.startswith("model.layers."):
      return (1, int(name.split(".")[2]), name)
    return (0 if "embed" in name else 2, 0, name)

  if model_cfg.scan_layers:  # leaf order: each stacked leaf reaches the host once
    return items
  return sorted(items, key=lambda t: order(t[0]))


def shard_plan(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
  """Greedy split of tensors (in order) into shards of at most max_shard_bytes."""
  shards, current, total = [], [], 0
  for i, size in enumerate(sizes):
    if current and total + size > max_shard_bytes:
      shards.append(current)
      current, total = [], 0
    current.append(i)
    total += size
  if current:
    shards.append(current)
  return shards


def save_weights(params: Any, model_cfg: ModelConfig, out_dir: str, dtype: str,
                 max_shard_bytes: int) -> list[str]:
  """Writes model.safetensors (or shards + index); returns the file names."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}.get(dtype)
  if np_dtype is None:
    raise ValueError(f"dtype={dtype!r}; expected 'float32', 'bfloat16' or 'float16'")
  items = hf_tensors(params, model_cfg)
  itemsize = np.dtype(np_dtype).itemsize
  sizes = [math.prod(shape) * itemsize for _, _, shape in items]
  shards = shard_plan(sizes, max_shard_bytes)
  files = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  weight_map = {}
  write = jax.process_index() == 0
  for file, members in zip(files, shards):
    tensors = {}
    for i in members:
      name, thunk, _ = items[i]
      tensors[name] = thunk().astype(np_dtype)  # every process joins any all-gather
      weight_map[name] = file
    if write:
      save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
  if write and len(files) > 1:
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}, f,
                indent=2)
  return files
