"""Hugging Face `config.json` <-> cpt_jax `config.model` fields.

Supported families: Llama, Mistral and Qwen2 (`*ForCausalLM`). Both the
transformers 4 layout (`rope_theta` + `rope_scaling`) and the transformers 5
layout (`rope_parameters`) are read; exports use the 4 layout, which both read.

Sliding-window attention (Mistral, Qwen2 with `use_sliding_window`) is not
implemented: our attention is full causal within a row. A window changes
nothing while rows are no longer than the window, so import only refuses it
when `seq_len` (the row length) exceeds the window.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cpt_jax import paths

FAMILIES = {  # model_type -> architecture
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
ARCHITECTURES = {arch: mt for mt, arch in FAMILIES.items()}
ROPE_TYPES = {"default": "", "linear": "linear", "llama3": "llama3"}


def read_config_json(path: str) -> dict[str, Any]:
  """The parsed `config.json` of a model folder (or the file itself)."""
  file = os.path.join(path, "config.json") if paths.as_path(path).is_dir() else path
  if not paths.as_path(file).is_file():
    raise FileNotFoundError(f"init_from_hf: no config.json at {file}")
  return json.loads(paths.as_path(file).read_text())


def model_type(hf: dict[str, Any], where: str = "config.json") -> str:
  """The family ('llama', 'mistral' or 'qwen2'); raises naming the field otherwise."""
  archs = hf.get("architectures") or []
  for arch in archs:
    if arch not in ARCHITECTURES:
      raise ValueError(f"{where}: architectures={archs} is not supported; expected one of "
                       f"{sorted(ARCHITECTURES)}")
  mt = hf.get("model_type")
  if mt is None and archs:
    mt = ARCHITECTURES[archs[0]]
  if mt not in FAMILIES:
    raise ValueError(f"{where}: model_type={mt!r} is not supported; expected one of "
                     f"{sorted(FAMILIES)}")
  return mt


def _rope_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or params
  field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"{where}: {field}.rope_type={rope_type!r} is not supported; expected "
                     f"one of {sorted(ROPE_TYPES)}")
  theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
  out = dict(rope_theta=float(theta), rope_scaling=ROPE_TYPES[rope_type],
             rope_scaling_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
             rope_original_max_len=8192)
  if rope_type in ("linear", "llama3"):
    out["rope_scaling_factor"] = float(scaling["factor"])
  if rope_type == "llama3":
    out.update(rope_low_freq_factor=float(scaling["low_freq_factor"]),
               rope_high_freq_factor=float(scaling["high_freq_factor"]),
               rope_original_max_len=int(scaling["original_max_position_embeddings"]))
  return out


def sliding_window(hf: dict[str, Any]) -> int | None:
  """The attention window in tokens if any layer uses one, else None."""
  mt = hf.get("model_type")
  window = hf.get("sliding_window")
  if not window:
    return None
  if mt == "mistral":
    return int(window)
  if mt == "qwen2":
    layer_types = hf.get("layer_types") or []
    if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
      return int(window)
  return None


def hf_model_config(path: str, seq_len: int | None = None) -> dict[str, Any]:
  """cpt_jax `config.model` fields for the model folder `path`.

  `seq_len` (the row length, `data.seq_len`) lets the check on sliding-window
  attention pass when the window never binds; without it a window is accepted.
  """
  hf = read_config_json(path)
  where = os.path.join(path, "config.json") if paths.as_path(path).is_dir() else path
  mt = model_type(hf, where)

  def require(field, ok, expected):
    if field in hf and hf[field] is not None and hf[field] not in ok:
      raise ValueError(f"{where}: {field}={hf[field]!r} is not supported; expected {expected}")

  require("hidden_act", ("silu", "swish"), "'silu'")
  require("mlp_bias", (False,), "false (the model has no MLP biases)")
  if mt != "qwen2":
    require("attention_bias", (False,), "false (the model has no o_proj bias)")
  require("partial_rotary_factor", (1, 1.0), "1.0")
  if hf.get("quantization_config"):
    raise ValueError(f"{where}: quantization_config is set; only unquantized weights load")
  window = sliding_window(hf)
  if window is not None and seq_len is not None and seq_len > window:
    raise ValueError(
        f"{where}: sliding_window={window} is smaller than data.seq_len={seq_len}; cpt_jax "
        f"attends over the whole row, so set data.seq_len <= {window}")

  for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"):
    if not isinstance(hf.get(field), int):
      raise ValueError(f"{where}: {field} is missing or not an integer")
  heads = hf["num_attention_heads"]
  kv_heads = hf.get("num_key_value_heads") or heads
  if heads % kv_heads:
    raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of "
                     f"num_key_value_heads={kv_heads}")
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  out = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=kv_heads, head_dim=int(head_dim),
      mlp_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=mt == "qwen2")
  out.update(_rope_fields(hf, where))
  return out


def default_architecture(model_cfg) -> str:
  return "Qwen2ForCausalLM" if model_cfg.qkv_bias else "LlamaForCausalLM"


def export_config(model_cfg, architecture: str, dtype: str,
                  base: dict[str, Any] | None = None,
                  max_position_embeddings: int | None = None) -> dict[str, Any]:
  """A transformers `config.json` dict for `model_cfg` (over `base` when given)."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture={architecture!r} is not supported; expected one of "
                     f"{sorted(ARCHITECTURES)}")
  mt = ARCHITECTURES[architecture]
  c = model_cfg
  if c.qkv_bias and mt != "qwen2":
    raise ValueError(f"model.qkv_bias=True needs architecture='Qwen2ForCausalLM', "
                     f"not {architecture!r}")
  if not c.qkv_bias and mt == "qwen2":
    raise ValueError("architecture='Qwen2ForCausalLM' needs model.qkv_bias=True")
  rope_scaling = None
  if c.rope_scaling == "linear":
    rope_scaling = {"rope_type": "linear", "factor": c.rope_scaling_factor}
  elif c.rope_scaling == "llama3":
    rope_scaling = {"rope_type": "llama3", "factor": c.rope_scaling_factor,
                    "low_freq_factor": c.rope_low_freq_factor,
                    "high_freq_factor": c.rope_high_freq_factor,
                    "original_max_position_embeddings": c.rope_original_max_len}
  elif c.rope_scaling:
    raise ValueError(f"model.rope_scaling={c.rope_scaling!r} has no transformers equivalent")
  out = {k: v for k, v in (base or {}).items()
         if k not in ("rope_parameters", "transformers_version", "dtype", "_name_or_path")}
  if max_position_embeddings is None and "max_position_embeddings" not in out:
    max_position_embeddings = (int(c.rope_original_max_len * c.rope_scaling_factor)
                               if c.rope_scaling == "llama3" else 8192)
  if max_position_embeddings is not None:
    out["max_position_embeddings"] = int(max_position_embeddings)
  out.update(
      architectures=[architecture], model_type=mt, vocab_size=c.vocab_size,
      hidden_size=c.d_model, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
      head_dim=c.resolved_head_dim, hidden_act="silu", rms_norm_eps=c.norm_eps,
      rope_theta=c.rope_theta, rope_scaling=rope_scaling,
      tie_word_embeddings=c.tie_embeddings, torch_dtype=dtype)
  if mt == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  if mt == "mistral":
    out["sliding_window"] = out.get("sliding_window")
  if mt == "qwen2":
    out.setdefault("use_sliding_window", False)
  return out
