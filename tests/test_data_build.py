"""The store build command: local, process-pool, Ray and Beam builds give byte-identical
stores; a multi-process run builds each store once (process 0) and the others wait."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import threading

import pytest

from cpt_jax.data import build as build_lib
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.data import store as store_lib
from tests import helpers


def _config(corpus, **data):
  c = helpers.tiny_config()
  c.data.update(corpus_dir=str(corpus), seq_len=16, shard_rows=7, build_buffer_tokens=64,
                **data)
  return c


def _files(cache) -> dict[str, bytes]:
  """{relative path: bytes} of every published store under `cache`."""
  out = {}
  for root, _, names in os.walk(cache):
    for n in names:
      p = pathlib.Path(root) / n
      out[str(p.relative_to(cache))] = p.read_bytes()
  return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return helpers.write_corpus(tmp_path_factory.mktemp("corpus"), docs=60)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """The stores a run builds for itself (in its pipeline), as bytes."""
  cache = tmp_path_factory.mktemp("run_cache")
  cfg = _config(corpus, cache_dir=str(cache))
  p = pipeline_lib.make_pipeline(cfg.data, global_batch_size=4)
  for d, s in p.run_splits():
    p._store(d, s)  # pylint: disable=protected-access
  p.close()
  files = _files(cache)
  assert len([f for f in files if f.endswith(store_lib.INDEX)]) == 6  # 3 domains x 2 splits
  assert any("rows-00001.bin" in f for f in files)  # several shards
  return files


@pytest.mark.parametrize("workers", [0, 2])
def test_local_build_equals_the_runs_own_stores(corpus, reference, tmp_path, workers):
  out = build_lib.build(_config(corpus), "local", cache_dir=str(tmp_path), workers=workers)
  assert len(out) == 6 and all(r["rows"] > 0 for r in out)
  assert _files(tmp_path) == reference


def test_ray_build_is_byte_identical(corpus, reference, tmp_path):
  pytest.importorskip("ray")
  build_lib.build(_config(corpus), "ray", cache_dir=str(tmp_path), workers=2)
  assert _files(tmp_path) == reference


@pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                    reason="apache-beam clashes with the pinned stack; run in its own env")
def test_beam_direct_runner_is_byte_identical(corpus, reference, tmp_path):
  build_lib.build(_config(corpus), "DirectRunner", cache_dir=str(tmp_path),
                  pipeline_args=["--direct_num_workers=2",
                                 "--direct_running_mode=multi_processing"])
  assert _files(tmp_path) == reference


def test_cli_builds_what_a_run_then_reads(corpus, reference, tmp_path):
  cfg_file = helpers.write_cli_config(tmp_path, corpus, **{
      "data.seq_len": 16, "data.shard_rows": 7, "data.build_buffer_tokens": 64})
  cache = tmp_path / "cache"
  env = {**os.environ, "PYTHONPATH": str(helpers.REPO)}
  p = subprocess.run([sys.executable, "-m", "cpt_jax.data.build", f"--config={cfg_file}",
                      f"--cache_dir={cache}", "--workers=0"], cwd=helpers.REPO, env=env,
                     capture_output=True, text=True, timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-2000:]
  assert len(p.stdout.strip().splitlines()) == 6
  assert _files(cache) == reference


def test_stage_configs_are_built_once_each(corpus, tmp_path):
  c = _config(corpus)
  c.stage_order = "a,b"
  c.stages.a = {"data": {"new": "alpha", "replay": ""}}
  c.stages.b = {"data": {"new": "beta", "replay": "alpha"}}
  jobs = build_lib.jobs_of(c, str(tmp_path))
  assert sorted((j.src.domain, j.src.split) for j in jobs) == [
      ("alpha", "train"), ("alpha", "validation"), ("beta", "train"), ("beta", "validation")]


def test_other_processes_wait_for_process_zero(corpus, tmp_path, monkeypatch):
  """With 2 processes on one cache_dir, each store is built once, by process 0."""
  built = []
  real = store_lib.build_into

  def spy(src, *a, **k):
    built.append((src.domain, src.split))
    return real(src, *a, **k)

  monkeypatch.setattr(store_lib, "build_into", spy)
  cfg = _config(corpus, cache_dir=str(tmp_path / "shared"))
  got = {}

  def host(i):
    p = pipeline_lib.make_pipeline(cfg.data, global_batch_size=4, process_index=i,
                                   process_count=2)
    got[i] = ([p.next_batch()["targets"] for _ in range(3)],
              {k: s.path for k, s in p._stores.items()})  # pylint: disable=protected-access
    p.close()

  waiting = threading.Thread(target=host, args=(1,))
  waiting.start()  # process 1 first: it must wait, not build
  host(0)
  waiting.join(120)
  assert sorted(built) == sorted(set(built)) and len(built) == 3  # the train stores, once
  assert got[0][1] == got[1][1]
  cfg.data.store_wait_seconds = 0.5
  cfg.data.cache_dir = str(tmp_path / "never")
  with pytest.raises(TimeoutError, match="store_wait_seconds"):
    pipeline_lib.make_pipeline(cfg.data, global_batch_size=4, process_index=1, process_count=2)


@pytest.mark.parametrize("key,value", [("shard_rows", 0), ("build_buffer_tokens", -1),
                                       ("store_wait_seconds", 0.0)])
def test_bad_build_settings_are_rejected_naming_the_key(corpus, key, value):
  cfg = _config(corpus)
  cfg.data[key] = value
  with pytest.raises(ValueError, match=f"data.{key}"):
    pipeline_lib.make_pipeline(cfg.data, global_batch_size=4)
