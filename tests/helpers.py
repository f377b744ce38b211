"""Tiny configs and synthetic corpora shared by the tests."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from cpt_jax import config as config_lib
from cpt_jax import stages


def tiny_config(**overrides):
  """A model small enough to compile in seconds on 2 cores."""
  c = config_lib.default_config()
  c.model.update(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=64)
  c.data.seq_len = 32
  c.train.update(steps=8, global_batch_size=8, log_every=2, checkpoint_every=4,
                 progress_bar=False, peak_flops=1e11, async_checkpoints=False)
  c.optimizer.update(lr=3e-3, warmup_steps=2)
  c.data.prefetch = 0
  c.data.new = "alpha"
  c.data.replay = "beta,gamma"
  for key, value in overrides.items():
    group, name = key.split(".")
    c[group][name] = value
  return c


def one_device_config(corpus, **overrides):
  """`tiny_config` on the corpus folder `corpus`, a constant LR, one device's mesh."""
  c = tiny_config(**overrides)
  c.data.corpus_dir = str(corpus)
  c.optimizer.schedule = "constant"
  c.sharding.mesh_shape = (1, 1, 1)
  return c


def train_one_device(config, workdir, **kw):
  """`stages.train` (the stage with its features) on the first device; its summary."""
  return stages.train(config, str(workdir), devices=jax.devices()[:1], **kw)


class Crash(Exception):
  """Raised by `crash_then_resume`'s metrics callback."""


def crash_then_resume(config, workdir, step: int):
  """Trains until the metrics of `step` (then raises Crash), resumes to the end; the summary."""
  def crash(s, record, pipeline):
    if s == step:
      raise Crash()
  try:
    train_one_device(config, workdir, on_metrics=crash)
  except Crash:
    pass
  else:
    raise AssertionError(f"the run never reached step {step}")
  return train_one_device(config, workdir)


WORDS = {
    "alpha": "the quick brown fox jumps over the lazy dog",
    "beta": "def f(x): return x * 2 + 1  # python code",
    "gamma": "lorem ipsum dolor sit amet consectetur adipiscing",
    "delta": "0123456789 ABCDEFGHIJ abcdefghij !@#$%^&*()",
}


def write_corpus(root: pathlib.Path, domains=("alpha", "beta", "gamma"), docs: int = 40,
                 seed: int = 0) -> pathlib.Path:
  """A small JSONL corpus: one folder per domain with train/validation splits."""
  rng = np.random.default_rng(seed)
  for d in domains:
    base = WORDS.get(d, d * 5).split()
    folder = root / d
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", docs), ("validation", max(4, docs // 8))):
      with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
          k = int(rng.integers(3, 12))
          text = " ".join(rng.choice(base, size=k).tolist())
          f.write(json.dumps({"id": f"{d}-{split}-{i}", "text": text}) + "\n")
  return root


REPO = pathlib.Path(__file__).resolve().parents[1]
CLI_CONFIG = """
import sys
sys.path.insert(0, {repo!r})
from tests import helpers
def get_config():
  return helpers.one_device_config({corpus!r}, **{overrides!r})
"""


def write_cli_config(folder: pathlib.Path, corpus, **overrides) -> pathlib.Path:
  """A config file for `python -m cpt_jax.main`: `one_device_config(corpus, **overrides)`."""
  path = folder / "config.py"
  path.write_text(CLI_CONFIG.format(repo=str(REPO), corpus=str(corpus), overrides=overrides))
  return path


def cli_command(config_file, workdir, *args, env=None) -> tuple[list[str], dict]:
  """(argv, env) of `python -m cpt_jax.main` on one CPU device."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3",
         "PYTHONPATH": str(REPO), **(env or {})}
  return [sys.executable, "-m", "cpt_jax.main", f"--config={config_file}",
          f"--workdir={workdir}", *args], env


def run_cli(config_file, workdir, *args, env=None, timeout=300) -> tuple[int, str, str]:
  """Runs `python -m cpt_jax.main`; (status, stdout, stderr)."""
  argv, env = cli_command(config_file, workdir, *args, env=env)
  p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=timeout, check=False)
  return p.returncode, p.stdout, p.stderr


PARITY_WORKER = pathlib.Path(__file__).with_name("hf_parity_worker.py")


def require_parity():
  """Skips the calling test unless torch and transformers are installed (never imported here)."""
  for dist in ("torch", "transformers"):
    try:
      importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
      pytest.skip(f"parity tests need torch and transformers (run in a subprocess by "
                  f"{PARITY_WORKER.name}): pip install -e '.[dev,hf,parity]'")


def parity_worker(*args):
  """Runs hf_parity_worker.py (torch + transformers only); returns its JSON answer."""
  env = {**os.environ, "USE_TF": "0", "USE_FLAX": "0", "USE_JAX": "0", "USE_TORCH": "1"}
  res = subprocess.run([sys.executable, str(PARITY_WORKER), *map(str, args)],
                       capture_output=True, text=True, timeout=900, env=env, check=False)
  if res.returncode != 0:
    pytest.fail(f"{PARITY_WORKER.name} {args[0]} exited {res.returncode}:\n"
                f"{res.stderr[-6000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])
