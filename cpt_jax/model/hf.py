"""Hugging Face model folders in and out: Llama, Mistral and Qwen2 checkpoints.

Import:  fields = hf_model_config(path, seq_len); c.model.update(fields)
         params = load_hf_params(path, ModelConfig.from_config(c.model), shardings)
Export:  save_hf(params, model_cfg, out_dir)   (loadable by `transformers`)
Vocab:   c.data.vocab = hf_vocab(path)

Config:  cfg = apply_hf_config(cfg)   (train.init_from_hf: model fields and tokenizer)

Exporting a run's checkpoint is `python -m cpt_jax.export` (it reads checkpoints).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import jax

from cpt_jax import paths
from cpt_jax.model.hf_config import default_architecture, export_config, read_config_json
from cpt_jax.model.hf_config import hf_model_config  # pylint: disable=unused-import
from cpt_jax.model.hf_vocab import TokenizerJsonVocab, hf_vocab  # pylint: disable=unused-import
from cpt_jax.model.hf_weights import load_hf_params, save_weights  # pylint: disable=unused-import
from cpt_jax.model.transformer import ModelConfig

__all__ = ["hf_model_config", "load_hf_params", "save_hf", "hf_vocab", "TokenizerJsonVocab",
           "apply_hf_config"]

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
MAX_SHARD_BYTES = 5_000_000_000  # transformers' usual 5GB shards


def save_hf(params: Any, model_cfg: ModelConfig, out_dir: str, *, dtype: str = "float32",
            architecture: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
            like: str | None = None) -> None:
  """Writes `params` as a transformers model folder (config.json + safetensors).

  architecture: 'LlamaForCausalLM', 'MistralForCausalLM' or 'Qwen2ForCausalLM'
  (default: Qwen2 when model.qkv_bias, else Llama). like: an HF folder (e.g. the
  one imported) whose config.json supplies the other fields (token ids,
  max_position_embeddings, ...) and whose tokenizer files are copied.
  Pass merged parameters (base + any tau): the tree must match `model_cfg`.
  """
  base = read_config_json(like) if like else None
  if architecture is None:
    archs = (base or {}).get("architectures") or [default_architecture(model_cfg)]
    architecture = archs[0]
  hf = export_config(model_cfg, architecture, dtype, base)
  target = out_dir  # a bucket folder: written locally, then uploaded
  out_dir = paths.staging_dir(target, prefix="cpt_jax-export-")
  save_weights(params, model_cfg, out_dir, dtype, max_shard_bytes)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf, f, indent=2, sort_keys=True)
    for name in TOKENIZER_FILES if like else ():
      if paths.as_path(like, name).is_file():
        with open(os.path.join(out_dir, name), "wb") as f:
          f.write(paths.as_path(like, name).read_bytes())
  paths.publish_dir(out_dir, target, upload=jax.process_index() == 0)


def apply_hf_config(cfg: Any) -> Any:
  """A copy of cfg whose model (and byte vocab) come from `train.init_from_hf`."""
  if not cfg.train.init_from_hf:
    return cfg
  out = copy.deepcopy(cfg)
  path = cfg.train.init_from_hf
  with out.unlocked():
    keep = {k: out.model[k] for k in ("dtype", "remat", "scan_layers", "attention",
                                      "vocab_pad_multiple", "init_std")}
    out.model.update(hf_model_config(path, seq_len=cfg.data.seq_len))
    out.model.update(keep)
    if out.data.vocab == "byte":
      try:
        out.data.vocab = hf_vocab(path)
      except FileNotFoundError:
        pass  # no tokenizer in the folder: keep the byte vocabulary
  return out
