"""Store build throughput and peak memory on generated corpora of about 0.25 GB and 1 GB.

  python benchmarks/store_build.py [--small] [--workdir /tmp] [--keep]
  /tmp/beam-venv/bin/python benchmarks/store_build.py    # + beam_tokens_per_sec

Writes a synthetic JSONL corpus (4 domains of random words, train and validation
splits) under --workdir, builds its stores (cpt_jax.data.build.build, byte
vocabulary, seq_len 1024) in a fresh process per build, and deletes everything
after. Prints one JSON object:
  local_tokens_per_sec   tokens / second of the in-process build (--workers=0) of the
                         large corpus: reading JSONL, tokenising, packing, writing
  pool_tokens_per_sec    the same with a local pool of 2 processes (one job per store)
  ray_tokens_per_sec, beam_tokens_per_sec
                         --runner=ray / --runner=DirectRunner (2 workers, multi_processing),
                         null when Ray / apache-beam is not importable
  peak_rss_mb_small, peak_rss_mb_large
                         the in-process builder's peak RSS on each corpus (goal: large
                         <= 1.2 x small and < 1024)
  corpus_mb_small, corpus_mb_large, tokens_large, loadavg (before / after)
--small: corpora of 25 MB and 100 MB (a quick run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpt_jax.data import store as store_lib  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ("news", "code", "math", "web")
CONFIG = """
from cpt_jax import config
def get_config():
  c = config.default_config()
  c.data.update(corpus_dir={corpus!r}, new="news", replay="code,math,web", seq_len=1024,
                build_buffer_tokens={buffer})
  return c
"""
CHILD = """
import importlib.util, json, resource, time
spec = importlib.util.spec_from_file_location("bench_config", {config!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
from cpt_jax.data import build
t0 = time.perf_counter()
out = build.build(mod.get_config(), {runner!r}, cache_dir={cache!r}, workers={workers!r},
                  pipeline_args={pipeline_args!r})
secs = time.perf_counter() - t0
print(json.dumps({{"seconds": secs, "tokens": sum(r["tokens"] for r in out),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def write_corpus(root: str, mb: int, seed: int = 0) -> int:
  """JSONL documents of random words, `mb` MB in all; returns the bytes written."""
  rng = np.random.default_rng(seed)
  words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(n)))
                    for n in rng.integers(2, 10, size=5000)])
  per = int(mb * (1 << 20) / len(DOMAINS) / (1 + 1 / 16))  # train bytes; validation 1/16
  total = 0
  for d in DOMAINS:
    os.makedirs(os.path.join(root, d), exist_ok=True)
    for split in ("train", "validation"):
      size = per if split == "train" else per // 16
      with open(os.path.join(root, d, f"{split}.jsonl"), "w") as f:
        written = 0
        while written < size:
          lens = rng.integers(20, 400, size=200)
          idx = rng.integers(0, words.size, size=int(lens.sum()))
          ends = np.cumsum(lens)
          lines = "".join(json.dumps({"text": " ".join(words[idx[e - n:e]])}) + "\n"
                          for n, e in zip(lens, ends))
          f.write(lines)
          written += len(lines)
        total += written
  return total


def build(corpus: str, cache: str, runner: str, workers: int, pipeline_args=(),
          buffer: int = store_lib.BUFFER_TOKENS) -> dict:
  """One build in a fresh process: {seconds, tokens, rss_mb}."""
  cfg = os.path.join(os.path.dirname(cache), "config.py")
  with open(cfg, "w") as f:
    f.write(CONFIG.format(corpus=corpus, buffer=buffer))
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  child = CHILD.format(config=cfg, runner=runner, cache=cache, workers=workers,
                       pipeline_args=list(pipeline_args))
  p = subprocess.run([sys.executable, "-c", child],
                     env=env, capture_output=True, text=True, check=False)
  if p.returncode:
    raise RuntimeError(p.stderr[-3000:])
  shutil.rmtree(cache, ignore_errors=True)
  return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", action="store_true", help="25 MB and 100 MB corpora")
  ap.add_argument("--workdir", default=tempfile.gettempdir())
  ap.add_argument("--buffer_tokens", type=int, default=0,
                  help="data.build_buffer_tokens (0 = its default)")
  args = ap.parse_args()
  sizes = (25, 100) if args.small else (256, 1024)
  buffer = args.buffer_tokens or store_lib.BUFFER_TOKENS
  out: dict = {"loadavg_before": os.getloadavg(), "build_buffer_tokens": buffer}
  root = tempfile.mkdtemp(prefix="cpt_store_build_", dir=args.workdir)
  try:
    for name, mb in zip(("small", "large"), sizes):
      corpus = os.path.join(root, f"corpus_{name}")
      out[f"corpus_mb_{name}"] = round(write_corpus(corpus, mb) / (1 << 20), 1)
      r = build(corpus, os.path.join(root, "cache"), "local", 0, buffer=buffer)
      out[f"peak_rss_mb_{name}"] = round(r["rss_mb"], 1)
      if name == "large":
        out["tokens_large"] = r["tokens"]
        out["local_tokens_per_sec"] = round(r["tokens"] / r["seconds"])
        r = build(corpus, os.path.join(root, "cache"), "local", 2, buffer=buffer)
        out["pool_tokens_per_sec"] = round(r["tokens"] / r["seconds"])
        for key, runner, extra, mod in (
            ("ray_tokens_per_sec", "ray", (), "ray"),
            ("beam_tokens_per_sec", "DirectRunner",
             ("--direct_num_workers=2", "--direct_running_mode=multi_processing"), "apache_beam")):
          if importlib.util.find_spec(mod) is None:
            out[key] = None
            continue
          r = build(corpus, os.path.join(root, "cache"), runner, 2, extra, buffer)
          out[key] = round(r["tokens"] / r["seconds"])
      shutil.rmtree(corpus, ignore_errors=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  out["rss_ratio_large_to_small"] = round(out["peak_rss_mb_large"] / out["peak_rss_mb_small"], 3)
  out["loadavg_after"] = os.getloadavg()
  out["command"] = " ".join(["python benchmarks/store_build.py"] + sys.argv[1:])
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
