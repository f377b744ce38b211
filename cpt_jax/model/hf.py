"""Hugging Face model folders in and out: Llama, Mistral and Qwen2 checkpoints.

Import:  fields = hf_model_config(path, seq_len); c.model.update(fields)
         params = load_hf_params(path, ModelConfig.from_config(c.model), shardings)
Export:  save_hf(params, model_cfg, out_dir)   (loadable by `transformers`)
Vocab:   c.data.vocab = hf_vocab(path)

Command line (export a run's latest checkpoint):
  python -m cpt_jax.model.hf export --checkpoint WORKDIR --out DIR [--like HF_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

from cpt_jax.model.hf_config import default_architecture, export_config, read_config_json
from cpt_jax.model.hf_config import hf_model_config  # pylint: disable=unused-import
from cpt_jax.model.hf_vocab import TokenizerJsonVocab, hf_vocab  # pylint: disable=unused-import
from cpt_jax.model.hf_weights import load_hf_params, save_weights  # pylint: disable=unused-import
from cpt_jax.model.transformer import ModelConfig

__all__ = ["hf_model_config", "load_hf_params", "save_hf", "hf_vocab", "TokenizerJsonVocab",
           "restore_for_export", "main"]

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
  os.makedirs(out_dir, exist_ok=True)
  save_weights(params, model_cfg, out_dir, dtype, max_shard_bytes)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  for name in TOKENIZER_FILES if like else ():
    if os.path.isfile(os.path.join(like, name)):
      shutil.copyfile(os.path.join(like, name), os.path.join(out_dir, name))


# ---------------------------------------------------------------- command line


def _run_config(checkpoint: str, config_path: str | None) -> dict:
  """The `model` group of the run's saved config.json."""
  if config_path is None:
    ckpt = os.path.abspath(checkpoint)
    candidates = [os.path.join(ckpt, "config.json"),
                  os.path.join(os.path.dirname(ckpt), "config.json")]
    config_path = next((p for p in candidates if os.path.isfile(p)), None)
    if config_path is None:
      raise FileNotFoundError(f"no run config.json in {candidates}; pass --config")
  with open(config_path, encoding="utf-8") as f:
    run = json.load(f)
  if "model" not in run:
    raise ValueError(f"{config_path}: no 'model' group")
  return run["model"]


def restore_for_export(checkpoint: str, model_cfg: ModelConfig, step: int | None = None) -> Any:
  """The params of an Orbax checkpoint (workdir or its checkpoints/), on one device."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from cpt_jax.model.transformer import Transformer  # pylint: disable=g-import-not-at-top
  from cpt_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from cpt_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  abstract = nn.unbox(state_lib.abstract_boxed_params(Transformer(model_cfg), 1))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          abstract)
  # A run with sigma / tau decomposition is exported merged (sigma + tau).
  from cpt_jax.parallel import sharding as shd  # pylint: disable=g-import-not-at-top
  from cpt_jax.train import decomposition  # pylint: disable=g-import-not-at-top
  return decomposition.restore_merged_params(
      checkpoint, abstract, state_lib.abstract_boxed_params(Transformer(model_cfg), 1),
      shd.make_mesh((1, 1, 1), jax.local_devices()[:1]), shd.DEFAULT_RULES, step)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m cpt_jax.model.hf", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="an Orbax checkpoint -> a transformers model folder")
  ex.add_argument("--checkpoint", required=True, help="run workdir or its checkpoints/ folder")
  ex.add_argument("--out", required=True, help="output folder")
  ex.add_argument("--config", default=None, help="run config.json (default: the workdir's)")
  ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ex.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  ex.add_argument("--architecture", default=None,
                  help="LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM")
  ex.add_argument("--like", default=None,
                  help="HF folder the run started from: config fields and tokenizer copied")
  ex.add_argument("--max-shard-bytes", type=int, default=MAX_SHARD_BYTES)
  args = parser.parse_args(argv)
  model_cfg = ModelConfig.from_config(_run_config(args.checkpoint, args.config))
  params = restore_for_export(args.checkpoint, model_cfg, args.step)
  save_hf(params, model_cfg, args.out, dtype=args.dtype, architecture=args.architecture,
          max_shard_bytes=args.max_shard_bytes, like=args.like)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
