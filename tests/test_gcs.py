"""Runs whose workdir and corpus live on gs://, against a local GCS server.

The server is `gcp-storage-emulator` (the dev extra) with the two GCS behaviours it lacks
added, started per module on a free port with each client a run uses pointed at it
(tests/gcs_server.py). What landed in the bucket is listed through the server's
JSON API with plain HTTP, a client of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import export as export_lib
from cpt_jax import paths
from cpt_jax import run as run_lib
from cpt_jax.model import hf
from cpt_jax.model.transformer import ModelConfig, Transformer
from cpt_jax.train import checkpoint as ckpt_lib
from cpt_jax.train import workdir as workdir_lib
from cpt_jax.train.state import TrainState
from tests import gcs_server
from tests.helpers import tiny_config, write_corpus

BUCKET = "cpt-test"
ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ no server needed


def test_uris_are_never_turned_into_local_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.is_remote("gs://b/run") and paths.is_remote("s3://b/x")
  assert not paths.is_remote("run") and not paths.is_remote("/abs/run")
  assert not paths.is_remote("file:///abs/run")
  assert paths.absolute("gs://b/run") == "gs://b/run"  # os.path.abspath: <cwd>/gs:/b/run
  assert os.fspath(paths.as_path("gs://b/run", "stages", "cpt")) == "gs://b/run/stages/cpt"
  assert paths.absolute("run") == str(tmp_path / "run")
  assert paths.absolute("file://" + str(tmp_path / "x")) == str(tmp_path / "x")
  lock = workdir_lib.WorkdirLock("gs://b/run")
  assert lock.path == "gs://b/run/run.lock" and lock.remote
  assert not list(tmp_path.iterdir())  # nothing like ./gs:/b/run was made


# os.path.abspath on local-only paths: the one helper, and the command line's traceback
# filter (source file names); the package's own `__file__` anywhere.
_ABSPATH_ALLOWED = {"cpt_jax/paths.py", "cpt_jax/main.py"}


def test_no_module_makes_a_possibly_remote_path_absolute_by_hand():
  """Paths a user gives (workdir, corpus, checkpoints, model folders) go through
  cpt_jax.paths; os.path.abspath is left to modules that only touch local files."""
  found = {}
  for f in sorted((ROOT / "cpt_jax").rglob("*.py")):
    rel = f.relative_to(ROOT).as_posix()
    for i, line in enumerate(f.read_text().splitlines(), 1):
      if (re.search(r"os\.path\.abspath\(", line) and "__file__" not in line
          and rel not in _ABSPATH_ALLOWED):
        found[f"{rel}:{i}"] = line.strip()
  assert not found, found


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  if gcs_server.missing():
    pytest.skip(f"{', '.join(gcs_server.missing())} not installed (pip install -e '.[dev]'): "
                "no local GCS server")
  with gcs_server.serving(tmp_path_factory.mktemp("gcs-data"), BUCKET) as server:
    yield server


def _upload(local: pathlib.Path, uri: str) -> None:
  for f in sorted(local.rglob("*")):
    if f.is_file():
      paths.as_path(uri, f.relative_to(local).as_posix()).write_bytes(f.read_bytes())


# ------------------------------------------------------------------------ runs on gs://


def _staged_config(corpus: str):
  c = tiny_config()  # data.cache_dir unset: the packed rows go to a local folder
  c.data.update(corpus_dir=corpus, new="", replay="")
  c.sharding.mesh_shape = (1, 1, 1)
  c.train.update(steps=4, log_every=2, checkpoint_every=2, eval_batches=1)
  c.stage_order = "pretrain,cpt"
  c.stages.pretrain = {"data": {"new": "alpha,beta"}}
  c.stages.cpt = {"init_from": "pretrain",
                  "data": {"new": "gamma", "replay": "alpha"},
                  "replay": {"strategy": "random", "fraction": 0.5,
                             "selection_fraction": 0.5}}
  return c


class _Crash(Exception):
  pass


def test_staged_run_with_its_workdir_and_corpus_on_gcs(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a URI made local would show up here as ./gs:
  _upload(write_corpus(tmp_path / "corpus_src", docs=60), f"gs://{BUCKET}/corpus")
  config = _staged_config(f"gs://{BUCKET}/corpus")
  work = f"gs://{BUCKET}/run"

  def crash_in_cpt(step, record, pipeline):
    if "gamma" in record.get("domain_loss", {}) and step == 4:
      raise _Crash()

  with pytest.raises(_Crash):
    run_lib.run(config, work, devices=jax.devices()[:1], on_metrics=crash_in_cpt)
  names = gcs.objects("run/")
  assert "run/stages/pretrain/summary.json" in names
  assert "run/stages/cpt/summary.json" not in names
  assert "run/run.lock" not in names and "run/stages/cpt/run.lock" not in names  # released
  assert any(n.startswith("run/stages/cpt/checkpoints/2/state/") for n in names), names

  report = run_lib.run(config, work, devices=jax.devices()[:1])  # resumes from the bucket
  names = gcs.objects("run/")
  cpt = json.loads(gcs.read("run/stages/cpt/summary.json"))
  assert cpt["init"] == "resumed from step 2" and cpt["steps_run"] == 2
  for name in ("report.json", "report.md", "domain_loss.png", "mixture_weights.png",
               "baseline.json", "stages/pretrain/metrics.jsonl", "stages/pretrain/eval.jsonl",
               "stages/pretrain/config.json", "stages/cpt/config_history.jsonl",
               "stages/cpt/replay_selection/selection.jsonl",
               "stages/cpt/replay_selection/meta.json",
               "stages/cpt/checkpoints/4/_CHECKPOINT_METADATA"):
    assert f"run/{name}" in names, name
  assert any(re.fullmatch(r"run/stages/cpt/tensorboard/events\.out\.tfevents\..*", n)
             for n in names), names
  assert not any(n.endswith("run.lock") or ".tmp" in n or n.startswith("run/baseline/")
                 for n in names), names  # locks released, no temporary objects or scratch
  assert json.loads(gcs.read("run/report.json"))["domains"] == report["domains"]
  steps = [json.loads(l)["step"] for l in gcs.read("run/stages/cpt/metrics.jsonl").splitlines()]
  assert steps == [2, 4]  # the crashed window's record dropped, then written once
  history = gcs.read("run/stages/cpt/config_history.jsonl").decode().splitlines()
  assert len(history) == 2  # the start and the resume, appended on a bucket
  sel = [json.loads(l) for l in gcs.read("run/stages/cpt/replay_selection/selection.jsonl")
         .splitlines()]
  assert sel and {r["domain"] for r in sel} == {"alpha"}
  # Orbax lists the bucket's steps (the resume above restored step 2 from there).
  assert ckpt_lib.Checkpointer(f"{work}/stages/cpt/checkpoints").all_steps() == [2, 4]
  assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*"))

  again = run_lib.run(config, work, devices=jax.devices()[:1])  # finished: both skipped
  assert again["loss_matrix"] == report["loss_matrix"]


def test_bucket_lock_refuses_a_second_run_and_is_released(gcs):
  first = workdir_lib.WorkdirLock(f"gs://{BUCKET}/locked").acquire()
  try:
    assert gcs.objects("locked/") == ["locked/run.lock"]
    assert json.loads(gcs.read("locked/run.lock"))["token"] == first.info["token"]
    with pytest.raises(workdir_lib.WorkdirLockedError, match="in use by another run"):
      workdir_lib.WorkdirLock(f"gs://{BUCKET}/locked").acquire()
  finally:
    first.release()
  assert gcs.objects("locked/") == []
  second = workdir_lib.WorkdirLock(f"gs://{BUCKET}/locked").acquire()
  second.release()


def test_bucket_lock_of_a_dead_run_on_this_host_is_taken_over(gcs):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier",
           "pid_start": "1", "token": "dead"}
  paths.as_path(f"gs://{BUCKET}/stale/run.lock").write_text(json.dumps(stale))
  lock = workdir_lib.WorkdirLock(f"gs://{BUCKET}/stale").acquire()
  try:
    assert json.loads(gcs.read("stale/run.lock"))["token"] == lock.info["token"]
  finally:
    lock.release()


def test_publishes_and_appends_on_a_bucket(gcs):
  uri = f"gs://{BUCKET}/files/a.jsonl"
  paths.append_text(uri, "1\n")
  paths.append_text(uri, "2\n")
  assert gcs.read("files/a.jsonl") == b"1\n2\n"  # an object cannot be appended: rewritten
  paths.write_atomic(f"gs://{BUCKET}/files/b.json", '{"x": 1}')
  assert gcs.objects("files/") == ["files/a.jsonl", "files/b.json"]  # no temporary object
  assert paths.create_new(f"gs://{BUCKET}/files/new", "x")
  assert not paths.create_new(f"gs://{BUCKET}/files/new", "y")  # ifGenerationMatch=0: 412
  assert gcs.read("files/new") == b"x"
  paths.upload_tree(str(ROOT / "cpt_jax" / "configs"), f"gs://{BUCKET}/files/tree")
  assert "files/tree/demo.py" in gcs.objects("files/tree/")
  paths.move(f"gs://{BUCKET}/files/tree", f"gs://{BUCKET}/files/moved")  # a folder
  assert not gcs.objects("files/tree/") and "files/moved/demo.py" in gcs.objects("files/moved/")
  paths.upload_tree(str(ROOT / "cpt_jax" / "configs"), f"gs://{BUCKET}/files/tree")
  local = paths.local_copy(f"gs://{BUCKET}/files/tree")
  demo = (ROOT / "cpt_jax" / "configs" / "demo.py").read_bytes()
  assert pathlib.Path(local, "demo.py").read_bytes() == demo
  staged = paths.staging_dir(f"gs://{BUCKET}/files/staged")  # export and profiler traces
  pathlib.Path(staged, "sub").mkdir()
  pathlib.Path(staged, "sub", "t.pb").write_bytes(b"trace")
  paths.publish_dir(staged, f"gs://{BUCKET}/files/staged")
  assert gcs.read("files/staged/sub/t.pb") == b"trace" and not os.path.exists(staged)


def test_export_to_and_import_from_a_bucket(gcs):
  """A checkpoint on gs:// exported to a gs:// Hugging Face folder (written locally, then
  uploaded), read back from there: config, weights, tokenizer."""
  pytest.importorskip("safetensors", reason="safetensors not installed: pip install -e '.[hf]'")
  tokenizers = pytest.importorskip("tokenizers", reason="tokenizers not installed (.[hf])")
  cfg = ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64)
  params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  params = nn.unbox(params)
  work = f"gs://{BUCKET}/hfrun"
  ckpt = ckpt_lib.Checkpointer(f"{work}/checkpoints", async_save=False)
  ckpt.save(3, TrainState(step=jnp.int32(3), params=params, opt_state={}), {"note": "x"})
  ckpt.close()
  paths.write_atomic(f"{work}/config.json", json.dumps({"model": dataclasses.asdict(cfg)}))
  export_lib.main(["--checkpoint", work, "--out", f"gs://{BUCKET}/hf"])
  assert {"hf/config.json", "hf/model.safetensors"} <= set(gcs.objects("hf/"))
  assert ModelConfig(**hf.hf_model_config(f"gs://{BUCKET}/hf")) == cfg
  loaded = hf.load_hf_params(f"gs://{BUCKET}/hf", cfg)
  for a, b in zip(jax.tree.leaves(loaded["layers_1"]), jax.tree.leaves(params["layers_1"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "</s>": 1, "fox": 2,
                                                          "[UNK]": 3}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  paths.write_atomic(f"gs://{BUCKET}/hf/tokenizer.json", tok.to_str())
  paths.write_atomic(f"gs://{BUCKET}/hf/tokenizer_config.json", '{"eos_token": "</s>"}')
  spec = hf.hf_vocab(f"gs://{BUCKET}/hf")
  assert spec == f"gs://{BUCKET}/hf/tokenizer.json"
  vocab = hf.TokenizerJsonVocab(spec)
  assert (vocab.vocab_size, vocab.eos_id) == (4, 1)
  np.testing.assert_array_equal(vocab.encode_batch(["fox fox"])[0], [2, 2])


def test_bucket_lock_of_another_host_is_stale_by_its_update_time(gcs):
  other = {"pid": 12345, "host": "another-host", "started": "earlier", "token": "other"}
  paths.as_path(f"gs://{BUCKET}/remote/run.lock").write_text(json.dumps(other))
  with pytest.raises(workdir_lib.WorkdirLockedError, match="another-host"):
    workdir_lib.WorkdirLock(f"gs://{BUCKET}/remote", stale_minutes=0).acquire()  # never
  time.sleep(2.5)  # the object's update time (the heartbeat) is now older than 1.2 s
  lock = workdir_lib.WorkdirLock(f"gs://{BUCKET}/remote", stale_minutes=0.02).acquire()
  try:
    assert json.loads(gcs.read("remote/run.lock"))["token"] == lock.info["token"]
  finally:
    lock.release()
