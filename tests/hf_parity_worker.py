r"""The `transformers` side of tests/test_hf.py's parity checks, in a process of its own.

The test process has JAX loaded and, through seqio, TensorFlow. torch must never be
imported beside TensorFlow: TensorFlow, then torch, then transformers'
`LlamaForCausalLM` dies with a segmentation fault with the CUDA builds of torch (issue 21).
This script imports numpy, torch and transformers only, refuses to finish if TensorFlow or
JAX got loaded anyway, and exchanges files with the test:

  python tests/hf_parity_worker.py build SPEC.json
      SPEC: {"tokens": "tokens.npy", "models": {NAME: {"config_class": "LlamaConfig",
             "kwargs": {...}, "dir": OUT_DIR, "logits": "logits.npy"}}}
      Builds each model (seed 0, non-trivial norms and biases), saves it with
      save_pretrained(OUT_DIR) and its logits on the tokens.
  python tests/hf_parity_worker.py load MODEL_DIR TOKENS.npy LOGITS.npy
      from_pretrained(MODEL_DIR); saves its logits on the tokens.

Each command prints one JSON line last: the model class names.
"""

import argparse
import json
import sys

import numpy as np
import torch
import transformers

FORBIDDEN = ("tensorflow", "jax", "flax", "seqio")


def _logits(model, tokens_path, logits_path):
  tokens_BxL = torch.tensor(np.load(tokens_path))
  with torch.no_grad():
    np.save(logits_path, model.eval()(tokens_BxL).logits.numpy())


def build(spec_path):
  with open(spec_path, encoding="utf-8") as f:
    spec = json.load(f)
  classes = {}
  for name, m in spec["models"].items():
    torch.manual_seed(0)
    hf_cfg = getattr(transformers, m["config_class"])(**m["kwargs"])
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms and biases
      for pname, p in model.named_parameters():
        if pname.endswith("norm.weight") or pname.endswith("bias"):
          p.add_(torch.randn_like(p) * 0.2)
    model.eval().save_pretrained(m["dir"])
    _logits(model, spec["tokens"], m["logits"])
    classes[name] = type(model).__name__
  return classes


def load(model_dir, tokens_path, logits_path):
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
  _logits(model, tokens_path, logits_path)
  return {"class": type(model).__name__}


def _check_alone():
  leaked = [m for m in FORBIDDEN if m in sys.modules]
  if leaked:
    sys.exit(f"hf_parity_worker: {leaked} loaded beside torch; this process must load torch "
             f"and transformers only (for transformers 4 set USE_TF=0 USE_FLAX=0)")


def main(argv):
  _check_alone()  # loaded by whoever started us
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("build").add_argument("spec")
  p = sub.add_parser("load")
  for arg in ("model_dir", "tokens", "logits"):
    p.add_argument(arg)
  args = parser.parse_args(argv)
  out = build(args.spec) if args.command == "build" else load(args.model_dir, args.tokens,
                                                                args.logits)
  _check_alone()  # loaded by transformers while it worked
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
