"""Per-process work of replay scoring and evaluation with 1 and 2 processes.

  python benchmarks/per_host.py [--devices 8] [--rows 512] [--repeats 3]

Runs itself as 1 process x D CPU devices, then as 2 processes x D/2 (jax.distributed on
localhost, gloo collectives): the same global mesh and batches. Each process builds a
small run (d_model 128, 4 layers, rows of 128 tokens, 3 domains; the stores built once
beforehand, so every process only reads them) and times, after a compile pass:

  scoring     `replay.scoring.Scorer.stream` over `--rows` rows of one domain's store
  evaluation  `Trainer.evaluate` over every domain's validation rows

counting the rows it gathered from the stores itself (its share of each global batch)
and, with 2 processes, the cost of one preemption check
(`multihost_utils.reached_preemption_sync_point`, asked after every step). Prints one
JSON object: {"1x<D>": {"processes": [...]}, "2x<D/2>": {...}, "load_avg": ...}. On a
real slice each process drives its own accelerators, so a process's rows (and time)
halve; on one CPU host the processes share the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORDS = "the quick brown fox jumps over a lazy dog while code runs and tests pass".split()


def _corpus(root: str, domains=("alpha", "beta", "gamma"), docs=400) -> str:
  rng = np.random.default_rng(0)
  for d in domains:
    os.makedirs(os.path.join(root, d), exist_ok=True)
    for split, n in (("train", docs), ("validation", docs // 4)):
      with open(os.path.join(root, d, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
          text = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 80))).tolist())
          f.write(json.dumps({"id": f"{d}-{split}-{i}", "text": f"{d} {text}"}) + "\n")
  return root


def _config(corpus: str, cache: str):
  from cpt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.default_config()
  c.model.update(vocab_size=259, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 mlp_dim=512)
  c.data.update(corpus_dir=corpus, cache_dir=cache, new="alpha", replay="beta,gamma",
                seq_len=128, prefetch=0)
  c.train.update(global_batch_size=32, eval_batches=0, progress_bar=False, peak_flops=1e11,
                 async_checkpoints=False)
  return c


def worker(spec: dict) -> dict:
  """One process's measurements (run with the launcher's variables set)."""
  from cpt_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  config = _config(spec["corpus"], spec["cache"])
  distributed.maybe_initialize(config.distributed)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from cpt_jax.replay import scoring  # pylint: disable=g-import-not-at-top
  from cpt_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from cpt_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  trainer = trainer_lib.Trainer(config, os.path.join(spec["workdir"], "w"))
  ctx, pipe = trainer.ctx, trainer.pipeline
  params = ctx.model_params(state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh,
                                                 config.seed, config.data.seq_len).params)
  store = pipe.full_training_store("beta")
  gathered = [0]
  gather = store.gather

  def counting_gather(rows):
    gathered[0] += int(np.asarray(rows).size)
    return gather(rows)
  store.gather = counting_gather
  scorer = scoring.Scorer(ctx.model, ctx.model_cfg, ctx.mesh, ctx.rules,
                          config.train.global_batch_size, config.data.seq_len, pipe.start_id)
  rows = np.arange(min(spec["rows"], store.num_rows))
  eval_rows = [0]
  batches = pipe.eval_batches

  def counting_batches(*a, **k):
    for b in batches(*a, **k):
      eval_rows[0] += int((b["loss_weights"].sum(-1) > 0).sum())
      yield b
  pipe.eval_batches = counting_batches
  out = {"process": jax.process_index(), "local_devices": jax.local_device_count()}
  for name, fn in (("scoring", lambda: [x for x in scorer.stream(params, store, rows)]),
                   ("evaluation", lambda: trainer.evaluate(params))):
    fn()  # compile
    gathered[0] = eval_rows[0] = 0
    times = []
    for _ in range(spec["repeats"]):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    out[name] = {"seconds": round(min(times), 4),
                 "rows_read_here": (gathered[0] if name == "scoring" else eval_rows[0])
                 // spec["repeats"]}
  out["scoring"]["rows_scored"] = int(rows.size)
  if jax.process_count() > 1:
    n, t0 = 1000, time.perf_counter()
    for i in range(1, n + 1):
      multihost_utils.reached_preemption_sync_point(i)
    out["preemption_check_us"] = round((time.perf_counter() - t0) / n * 1e6, 2)
  trainer.close()
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(n: int, devices: int, spec: dict) -> list[dict]:
  port, procs = _free_port(), []
  for i in range(n):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // n}",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if n > 1:
      env.update(COORDINATOR=f"localhost:{port}", NUM_PROCESSES=str(n), PROCESS_ID=str(i))
    procs.append(subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, __file__, "--worker", json.dumps({**spec, "workdir": os.path.join(
            spec["workdir"], f"{n}_{i}")})], env=env, stdout=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    stdout, _ = p.communicate(timeout=1200)
    if p.returncode:
      raise RuntimeError(f"a worker failed ({p.returncode})")
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  return sorted(outs, key=lambda o: o["process"])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--rows", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--worker", default="")
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))), flush=True)
    return
  with tempfile.TemporaryDirectory() as tmp:
    spec = {"corpus": _corpus(os.path.join(tmp, "corpus")), "cache": os.path.join(tmp, "cache"),
            "rows": args.rows, "repeats": args.repeats, "workdir": tmp}
    from cpt_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
    c = _config(spec["corpus"], spec["cache"])
    pipeline_lib.make_pipeline(c.data, global_batch_size=32).close()  # stores built once
    load = os.getloadavg()
    result = {f"1x{args.devices}": {"processes": launch(1, args.devices, spec)},
              f"2x{args.devices // 2}": {"processes": launch(2, args.devices, spec)}}
  result["load_avg_before"] = [round(x, 2) for x in load]
  result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
