r"""Builds a config's packed-row stores ahead of training, on one machine or several.

  python -m cpt_jax.data.build --config=configs/demo.py --cache_dir=/data/cache \
      [--runner=local --workers=2]
  python -m cpt_jax.data.build --config=configs/demo.py --cache_dir=gs://bucket/cache \
      --runner=ray [--ray_address=auto]
  python -m cpt_jax.data.build --config=configs/demo.py --cache_dir=/data/cache \
      --runner=DirectRunner -- --direct_num_workers=2 --direct_running_mode=multi_processing

Every (domain, split) that the config's run, or any of its stages, reads is one
job (`store.BuildJob`): the same streaming build (`store.build_or_load`: bounded
memory, atomic publish, content-keyed cache) whichever engine runs it, so
the stores are byte-identical. Runners:
  local         in this process (--workers=0) or a local pool of spawned processes
                (default; seqio Task jobs stay in this process, where they are registered).
  ray           one Ray task per job on the cluster at --ray_address (`pip install
                ".[ray]"`), a fresh local one by default.
  <Beam runner> (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...) an
                Apache Beam pipeline, one element per job; arguments after `--` are
                Beam pipeline options. apache-beam is not an extra of this project:
                its releases require protobuf < 7, pyarrow < 26 and pillow < 13, which
                the pinned stack is past, so it runs from a separate environment.
Workers must see --cache_dir (a shared folder or a bucket) and the corpus; Ray and
Beam workers see registered seqio Tasks only if their code registers them (build seqio
domains with --runner=local otherwise). A run
then finds the stores by their keys when its data.cache_dir is the same folder.
A job whose store is already published returns at once.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import sys
from typing import Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from cpt_jax import config as config_lib
from cpt_jax.data import domain_stores
from cpt_jax.schema import data as data_schema
from cpt_jax.data import store as store_lib
from cpt_jax.data import tasks as tasks_lib

RUNNERS = ("local", "ray")  # anything else names an Apache Beam runner


def jobs_of(config: ml_collections.ConfigDict, cache_dir: str = "",
            workdir: str | None = None) -> list[store_lib.BuildJob]:
  """The build jobs of every store `config` (its run, or each of its stages) reads, once each.

  cache_dir overrides data.cache_dir; else the data cache of `workdir` as a run uses it.
  """
  names = config_lib.stage_names(config) if config.get("stage_order") else [None]
  jobs: dict[tuple, store_lib.BuildJob] = {}
  for name in names:
    cfg = config if name is None else config_lib.stage_config(config, name)
    data = ml_collections.ConfigDict(cfg.data.to_dict())
    if cache_dir:
      data.cache_dir = cache_dir
    data_schema.validate_data_config(data)
    for job in domain_stores.DomainStores(data, workdir).build_jobs():
      jobs.setdefault((job.cache_dir, job.key()), job)
  return list(jobs.values())


def _run_job(job: store_lib.BuildJob) -> dict:
  return _summary(job, job.run())


def _summary(job: store_lib.BuildJob, st: store_lib.PackedStore) -> dict:
  return {"path": st.path, "domain": job.src.domain, "split": job.src.split,
          "rows": st.num_rows, "tokens": int(st.meta["tokens"])}


def run_local(jobs: Sequence[store_lib.BuildJob], workers: int = 2) -> list[dict]:
  """Runs the jobs in this process (workers=0) or a pool of `workers` fresh (spawned)
  processes; seqio Task jobs run here, where the Tasks are registered."""
  here = [workers <= 0 or j.src.kind == tasks_lib.SEQIO for j in jobs]
  out: list[dict | None] = [_run_job(j) if h else None for j, h in zip(jobs, here)]
  rest = [j for j, h in zip(jobs, here) if not h]
  if rest:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process running JAX threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      done = iter(pool.map(_run_job, rest))
    out = [r if r is not None else next(done) for r in out]
  return out


def run_ray(jobs: Sequence[store_lib.BuildJob], address: str | None = None,
            workers: int = 2) -> list[dict]:
  """One Ray task per job on the cluster at `address` (None: a local one of `workers` CPUs)."""
  try:
    import ray  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError('--runner=ray needs Ray: pip install -e ".[ray]"') from None
  started = not ray.is_initialized()
  if started:
    ray.init(address=address, num_cpus=None if address else max(workers, 1),
             include_dashboard=False, log_to_driver=False)
  try:
    task = ray.remote(num_cpus=1)(_run_job)
    return ray.get([task.remote(j) for j in jobs])
  finally:
    if started:
      ray.shutdown()


def run_beam(jobs: Sequence[store_lib.BuildJob], runner: str,
             pipeline_args: Sequence[str] = ()) -> list[dict]:
  """An Apache Beam pipeline of one element per job on `runner`; returns the results."""
  try:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        f"--runner={runner} needs apache-beam, which requires protobuf < 7, pyarrow < 26 and "
        "pillow < 13 (this project pins protobuf 7.36.2, pyarrow 26.0.1, pillow 13.0.0): "
        "install it in a separate environment (python -m venv --system-site-packages ...; "
        "pip install apache-beam) or use --runner=local / ray") from None
  opts = pipeline_options.PipelineOptions(list(pipeline_args), runner=runner)
  with beam.Pipeline(options=opts) as p:
    _ = p | "jobs" >> beam.Create(list(jobs)) | "build" >> beam.Map(_run_job)
  return [_describe(j) for j in jobs]  # what the workers published


def _describe(job: store_lib.BuildJob) -> dict:
  found = store_lib.find(job.src, job.cache_dir, job.key())
  if not found:
    raise RuntimeError(f"store of {job.src.domain}/{job.src.split} was not published")
  return _summary(job, store_lib.PackedStore(found))


def build(config: ml_collections.ConfigDict, runner: str = "local", *, cache_dir: str = "",
          workdir: str | None = None, workers: int = 2, ray_address: str | None = None,
          pipeline_args: Sequence[str] = ()) -> list[dict]:
  """Builds every store of `config` with `runner`; one dict per store (path, rows, tokens)."""
  jobs = jobs_of(config, cache_dir, workdir)
  if runner == "local":
    return run_local(jobs, workers)
  if runner == "ray":
    return run_ray(jobs, ray_address, workers)
  return run_beam(jobs, runner, pipeline_args)


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program: importing this module
  next to another command line's flags must not clash)."""
  config_flags.DEFINE_config_file("config", None, "An ml_collections config file.")
  flags.DEFINE_string("cache_dir", "", "Store cache (default: data.cache_dir, else "
                      "<workdir>/data_cache).")
  flags.DEFINE_string("workdir", None, "A single run's workdir: its default cache "
                      "<workdir>/data_cache (a staged run keeps one per stage: give its "
                      "stages the same data.cache_dir and pass it as --cache_dir).")
  flags.DEFINE_string("runner", "local", "local | ray | an Apache Beam runner name.")
  flags.DEFINE_integer("workers", 2, "local / ray: processes (0 = in this process).")
  flags.DEFINE_string("ray_address", None, "ray: the cluster (None = a local one).")
  flags.mark_flags_as_required(["config"])


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  results = build(f.config, f.runner, cache_dir=f.cache_dir, workdir=f.workdir,
                  workers=f.workers, ray_address=f.ray_address, pipeline_args=argv[1:])
  for r in results:
    sys.stdout.write(json.dumps(r, sort_keys=True) + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
