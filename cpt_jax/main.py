r"""Command line entry point.

  python -m cpt_jax.main --config=configs/demo.py --workdir=/tmp/cpt_demo \
      [--config.train.steps=100 ...]

A config with a non-empty `stages` list runs them in order (continued
pre-training); otherwise it is a single training run. `--config=NAME[:ARG]`
that is not a file names a config packaged in `cpt_jax/configs/` (`demo`,
`llama3_2_1b:v5e-8`, ...), so the same commands work after `pip install`; the
`cpt-jax` console script is this module.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cpt_jax import configs
from cpt_jax import run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, reports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library chatter off; --verbosity=0 restores it
  run.run(_CONFIG.value, _WORKDIR.value)


def resolve_argv(argv: list[str]) -> list[str]:
  """argv with `--config=NAME[:ARG]` pointed at the packaged config NAME when it is no file."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + configs.resolve(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = configs.resolve(out[i + 1])
  return out


def cli() -> None:
  """The `cpt-jax` console script."""
  sys.argv = resolve_argv(sys.argv)
  app.run(main)


if __name__ == "__main__":
  cli()
