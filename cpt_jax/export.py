"""Exports a run's checkpoint as a Hugging Face model folder (loadable by `transformers`).

  python -m cpt_jax.export --checkpoint WORKDIR --out DIR [--like HF_DIR] [--step N]

Reads the run's `config.json` for the model shape, restores the params of the
latest (or `--step`) checkpoint on one device, merges a sigma / tau
decomposition's tau into the model, and writes config.json + safetensors
(`model/hf.py` `save_hf`); `--like` copies the config fields and tokenizer of
the HF folder the run started from.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import flax.linen as nn
import jax

from cpt_jax import paths
from cpt_jax.model import hf
from cpt_jax.model.transformer import ModelConfig, Transformer
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import checkpoint as ckpt_lib
from cpt_jax.train import state as state_lib

def _run_config(checkpoint: str, config_path: str | None) -> dict:
  """The `model` group of the run's saved config.json."""
  if config_path is None:
    ckpt = paths.as_path(checkpoint)
    candidates = [os.fspath(ckpt / "config.json"), os.fspath(ckpt.parent / "config.json")]
    config_path = next((p for p in candidates if paths.as_path(p).is_file()), None)
    if config_path is None:
      raise FileNotFoundError(f"no run config.json in {candidates}; pass --config")
  run = json.loads(paths.as_path(config_path).read_text())
  if "model" not in run:
    raise ValueError(f"{config_path}: no 'model' group")
  return run["model"]


def restore_for_export(checkpoint: str, model_cfg: ModelConfig, step: int | None = None) -> Any:
  """The params of an Orbax checkpoint (workdir or its checkpoints/), on one device."""
  abstract = nn.unbox(state_lib.abstract_boxed_params(Transformer(model_cfg), 1))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          abstract)
  # A run with sigma / tau decomposition is exported merged (sigma + tau).
  return ckpt_lib.restore_merged_params(
      checkpoint, abstract, state_lib.abstract_boxed_params(Transformer(model_cfg), 1),
      shd.make_mesh((1, 1, 1), jax.local_devices()[:1]), shd.DEFAULT_RULES, step,
      source="--checkpoint")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m cpt_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="run workdir or its checkpoints/ folder")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--config", default=None, help="run config.json (default: the workdir's)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  parser.add_argument("--architecture", default=None,
                      help="LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM")
  parser.add_argument("--like", default=None,
                      help="HF folder the run started from: config fields and tokenizer copied")
  parser.add_argument("--max-shard-bytes", type=int, default=hf.MAX_SHARD_BYTES)
  args = parser.parse_args(argv)
  model_cfg = ModelConfig.from_config(_run_config(args.checkpoint, args.config))
  params = restore_for_export(args.checkpoint, model_cfg, args.step)
  hf.save_hf(params, model_cfg, args.out, dtype=args.dtype, architecture=args.architecture,
             max_shard_bytes=args.max_shard_bytes, like=args.like)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
