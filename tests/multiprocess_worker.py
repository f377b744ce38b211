"""One process of a multi-process staged run on CPU devices (tests/test_multiprocess.py).

  python tests/multiprocess_worker.py SPEC.json

with COORDINATOR / NUM_PROCESSES / PROCESS_ID and XLA_FLAGS in the environment, as a
launcher would set them. SPEC: {"corpus", "cache", "mesh", "workdir", "sigterm": a step of
the cpt stage or null}. It does what `python -m cpt_jax.main` does (the start-up, then the
run; a preemption exits 0), and with "sigterm" the process sends itself SIGTERM after that
step of the cpt stage, then pauses so the notice reaches the other processes while they
step on. `staged_config` is the run, shared with the test's one-process references.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from cpt_jax import config as config_lib
from cpt_jax import run as run_lib
from cpt_jax.parallel import distributed
from cpt_jax.train import preemption
from tests import helpers

DOMAINS = ("alpha", "beta", "gamma", "delta")


def staged_config(corpus: str, cache: str, mesh=(-1, 1, 1)):
  """pretrain (4 steps) -> cpt (10 steps: a teacher on distill rows, online replay, a
  DoReMi rate controller); every step logged, every other one checkpointed."""
  c = helpers.tiny_config()
  c.data.update(corpus_dir=str(corpus), cache_dir=str(cache), new="", replay="")
  c.sharding.mesh_shape = tuple(mesh)
  c.train.update(steps=4, log_every=1, checkpoint_every=2, eval_batches=1,
                 keep_checkpoints=10)
  c.stage_order = "pretrain,cpt"
  c.stages.pretrain = {"data": {"new": "alpha,beta,gamma"}}
  c.stages.cpt = {
      "init_from": "pretrain",
      "data": {"new": "delta", "replay": "alpha,gamma", "distill": "beta"},
      "objective": {"lambda_kd": 1.0},
      "train": {"steps": 10},
      "replay": {"strategy": "online", "fraction": 0.5, "selection_fraction": 0.5,
                 "online_every": 2, "online_pool": 40, "online_swap": 0.5},
      "mixing": {"controller": "doremi", "update_every": 2, "new_min_share": 0.25}}
  config_lib.validate_stages(c)
  return c


def main(spec_path: str) -> None:
  spec = json.load(open(spec_path, encoding="utf-8"))
  config = staged_config(spec["corpus"], spec["cache"], spec["mesh"])
  distributed.maybe_initialize(config.distributed)  # as main.py: before any JAX call
  on_metrics = None
  if spec.get("sigterm"):
    at = int(spec["sigterm"])

    def on_metrics(step, record, pipeline):  # pylint: disable=function-redefined
      del record
      if step == at and "distill" in pipeline.roles:  # the cpt stage
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3.0)  # the others step on (and wait in the next step's collectives)
  try:
    run_lib.run(config, spec["workdir"], on_metrics=on_metrics)
  except preemption.Preempted as e:
    print(f"[worker] {e}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
