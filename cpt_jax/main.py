r"""Command line entry point.

  python -m cpt_jax.main --config=configs/demo.py --workdir=/tmp/cpt_demo \
      [--config.train.steps=100 ...] [--traceback]

A config with a non-empty `stages` list runs them in order (continued
pre-training); otherwise it is a single training run. `--config=NAME[:ARG]`
that is not a file names a config packaged in `cpt_jax/configs/` (`demo`,
`llama3_2_1b:v5e-8`, ...), so the same commands work after `pip install`; the
`cpt-jax` console script is this module.

A user error (an unknown or badly typed `--config.*` override, a value the config
validation rejects, missing or unreadable data, a warm start that does not fit, a
changed config on a resume, a workdir another run holds) prints one line,
`error: ...`, and exits with status 2. Errors the project did not raise itself keep
their traceback (a bug); `--traceback` or CPT_JAX_TRACEBACK=1 shows it for every error.

A multi-process launch is detected and `jax.distributed.initialize` called before
anything else touches JAX (parallel/distributed.py). On SIGTERM the run saves a
checkpoint at the next step boundary all processes agree on and exits 0; the same
command resumes it (train/preemption.py).
"""

import contextlib
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cpt_jax import configs
from cpt_jax import run
from cpt_jax.parallel import distributed
from cpt_jax.train import checkpoint as ckpt_lib
from cpt_jax.train import preemption
from cpt_jax.train import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, reports.")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the traceback of a user error too (also CPT_JAX_TRACEBACK=1).")
flags.mark_flags_as_required(["config", "workdir"])

USAGE_STATUS = 2  # the exit status of a user error
_PACKAGE = os.path.dirname(os.path.abspath(run.__file__))
# Errors the project raises for what a user set or supplied, whatever raised them.
_ALWAYS_USER = (workdir_lib.WorkdirLockedError, ckpt_lib.RestoreError)
# Errors that are a user's when the project raised them (else a bug: traceback).
_USER_IF_OURS = (ValueError, FileNotFoundError)
# What parsing the flags raises for a bad command line (config_flags: AttributeError /
# KeyError for an unknown key, TypeError / ValueError for a value of the wrong type).
_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)


def _want_traceback(argv=()) -> bool:
  return ("--traceback" in argv or os.environ.get("CPT_JAX_TRACEBACK", "") not in ("", "0")
          or (flags.FLAGS.is_parsed() and _TRACEBACK.value))


def one_line(msg: str) -> str:
  """`msg` on one line: whitespace runs (newlines included) become one space."""
  return " ".join(str(msg).split())


def fail(msg: str) -> None:
  """Prints `error: msg` on one line to stderr and exits with USAGE_STATUS."""
  sys.stderr.write(f"error: {one_line(msg)}\n")
  sys.stderr.flush()
  sys.exit(USAGE_STATUS)


def raised_by_project(error: BaseException) -> bool:
  """Whether the innermost frame of `error`'s traceback is cpt_jax's own code."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE + os.sep)


def is_user_error(error: BaseException) -> bool:
  return isinstance(error, _ALWAYS_USER) or (
      isinstance(error, _USER_IF_OURS) and raised_by_project(error))


def flag_error_message(error: BaseException, argv) -> str:
  """One line for a command line the flags cannot parse, naming the argument."""
  text = one_line(str(error).replace("\\n", " "))
  if isinstance(error, (AttributeError, KeyError)):
    text = text.strip("'\" ")
    key = re.match(r"\W*(\w+)", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    for arg in argv[1:]:
      path = arg.split("=", 1)[0].lstrip("-")
      if key and path.startswith("config.") and key[1] in path.split(".")[1:]:
        parent = path[len("config."):].rsplit(".", 1)[0] if path.count(".") > 1 else ""
        guess = (f" (did you mean '{parent + '.' if parent else ''}{hint[1]}'?)"
                 if hint else "")
        return one_line(f"{arg}: unknown config key '{path[len('config.'):]}'{guess}")
  return text


def parse_flags(argv):
  """absl's flag parsing; a bad command line is one `error:` line and status 2."""
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    if _want_traceback(argv):
      raise
    fail(flag_error_message(e, argv))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library chatter off; --verbosity=0 restores it
  try:
    config = _CONFIG.value
    config.keys()  # a file that failed to load raises on first use
  except OSError as e:  # config_flags reports a config file it could not load here
    if _want_traceback():
      raise
    fail(f"--config: {e}")
  try:
    distributed.maybe_initialize(config.distributed)  # first: before any JAX call
    with (contextlib.nullcontext() if distributed.is_initialized()  # JAX's notifier has it
          else preemption.sigterm_requests()):
      run.run(config, _WORKDIR.value)
  except preemption.Preempted as e:  # saved: the launcher restarts the same command
    print(f"[cpt_jax] {e}", flush=True)
  except Exception as e:  # pylint: disable=broad-except  # user errors: one line
    if _want_traceback() or not is_user_error(e):
      raise
    fail(str(e))


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
  """The `cpt-jax` console script (and `python -m cpt_jax.main`)."""
  sys.argv = resolve_argv(sys.argv)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
