"""Stand-in for `python3 -m cpt_jax.main` in the launch tests: records how it was started.

Appends JSON lines to $STANDIN_OUT (default $HOME)/standin-<rank>.jsonl, rank being
SLURM_PROCID or TPU_WORKER_ID: {"phase": "start"} and, unless killed, {"phase": "end"},
each with its argv (after the program), cwd, pid, the package's VERSION when it runs as
`python3 -m <package>.main` from a shipped copy, and the launch-related environment.
Arguments it acts on (the rest are only recorded): --sleep=S (seconds between the two
records), --exit_status=N (its exit status), --jax_init (jax.distributed.initialize() with
no arguments, as cpt_jax does with distributed.initialize=yes; records process index/count).
"""

import json
import os
import sys
import time

ENV = ("JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES", "SLURM_PROCID", "SLURM_NTASKS",
       "TF_FORCE_GPU_ALLOW_GROWTH", "TPU_WORKER_ID", "PYTHONPATH", "HOME")


def option(name, default=None):
  for a in sys.argv[1:]:
    if a == f"--{name}":
      return ""
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return default


def record(phase, **extra):
  try:
    from . import VERSION  # pylint: disable=import-outside-toplevel
  except ImportError:
    VERSION = None  # pylint: disable=invalid-name
  rank = os.environ.get("SLURM_PROCID", os.environ.get("TPU_WORKER_ID", "0"))
  out = os.environ.get("STANDIN_OUT", os.environ["HOME"])
  line = dict(phase=phase, argv=sys.argv[1:], cwd=os.getcwd(), pid=os.getpid(),
              version=VERSION, env={k: os.environ.get(k) for k in ENV}, **extra)
  with open(os.path.join(out, f"standin-{rank}.jsonl"), "a") as f:
    f.write(json.dumps(line) + "\n")


def main():
  extra = {}
  if option("jax_init") is not None:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize()
    extra = dict(process_index=jax.process_index(), process_count=jax.process_count())
    jax.distributed.shutdown()
  record("start", **extra)
  time.sleep(float(option("sleep", "0")))
  record("end")
  print(f"stand-in run on {os.environ.get('TPU_WORKER_ID', '?')} done")
  return int(option("exit_status", "0"))


if __name__ == "__main__":
  sys.exit(main())
