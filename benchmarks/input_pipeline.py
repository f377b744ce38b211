"""Input pipeline throughput: 5 domains mixed into packed [16, 256] batches.

  python benchmarks/input_pipeline.py [--corpora DIR] [--no_spm] [--no_gcs]

Prints one JSON object: tokens_per_sec (batch slots B*L per second through
`next_batch` with prefetch, byte vocabulary, warm cache), ratio_to_train_step
(tokens_per_sec / bench_lib.train_step_tokens_per_sec(config), null
when that is not importable), cold build time, and the same figures for a
SentencePiece vocabulary trained on the fly. Without a corpus directory it
falls back to the builtin stdlib corpus.

`gcs`: the byte pipeline with data.cache_dir=gs://<bucket>/cache on a local
gcp-storage-emulator (tests/gcs_server.py; on when it and gcsfs are installed):
the stores are written to the bucket and read with ranged reads over loopback
HTTP to a single-threaded Python server, so these are emulator figures, not
GCS latency or bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_lib as bench  # pylint: disable=wrong-import-position
from cpt_jax.data import builtin_corpus  # pylint: disable=wrong-import-position
from cpt_jax.data import pipeline as pipeline_lib  # pylint: disable=wrong-import-position
from cpt_jax.data import sources as sources_lib  # pylint: disable=wrong-import-position
from cpt_jax.schema import data as config_lib  # pylint: disable=wrong-import-position
from tests import gcs_server  # pylint: disable=wrong-import-position

BUCKET = "cpt-bench"


def byte_config(corpus: str, domains: list[str], seq_len: int, prefetch: int, cache_dir: str):
  """data config: domains[0] new, the rest replay, byte vocabulary."""
  cfg = config_lib.default_data_config()
  cfg.update(corpus_dir=corpus, new=domains[0], replay=",".join(domains[1:]), seq_len=seq_len,
             prefetch=prefetch, cache_dir=cache_dir)
  return cfg


def measure(cfg, batch: int, steps: int, warmup: int = 20) -> dict:
  t0 = time.perf_counter()
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=batch)
  build_s = time.perf_counter() - t0
  p.close()
  out, prefetch_given = {"build_seconds_cold": round(build_s, 3)}, cfg.prefetch
  for prefetch in (prefetch_given, 0):
    cfg.prefetch = prefetch
    t0 = time.perf_counter()
    p = pipeline_lib.make_pipeline(cfg, global_batch_size=batch)
    load_s = time.perf_counter() - t0
    for _ in range(warmup):  # warm up (page cache, permutations)
      p.next_batch()
    real = 0
    t0 = time.perf_counter()
    for _ in range(steps):
      real += int(p.next_batch()["loss_weights"].sum())
    dt = time.perf_counter() - t0
    p.close()
    key = "prefetch" if prefetch else "sync"
    out[f"tokens_per_sec_{key}"] = round(steps * batch * cfg.seq_len / dt)
    out[f"nonpad_tokens_per_sec_{key}"] = round(real / dt)
    out["load_seconds_warm"] = round(load_s, 3)
    out["padding_fraction"] = round(1 - real / (steps * batch * cfg.seq_len), 4)
  cfg.prefetch = prefetch_given
  return out


def measure_gcs(cfg, batch: int, steps: int, tmp: str) -> dict:
  """`measure` with the stores in a bucket of a local GCS emulator."""
  data_dir = os.path.join(tmp, "gcs")
  os.makedirs(data_dir)
  with gcs_server.serving(data_dir, BUCKET) as server:
    cfg.cache_dir = f"gs://{BUCKET}/cache"
    out = measure(cfg, batch, steps, warmup=min(20, steps))
    out["objects"] = len(server.objects("cache/"))
  out.update(steps=steps, cache_dir=cfg.cache_dir,
             note="local gcp-storage-emulator over loopback HTTP (one Python server "
                  "thread, objects in memory): emulator figures, not GCS latency")
  return out


def train_spm(corpus: str, domains: list[str], out_dir: str, vocab_size: int) -> tuple[str, float]:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  sample = os.path.join(out_dir, "spm_input.txt")
  with open(sample, "w", encoding="utf-8") as f:
    for d in domains:
      n = 0
      for line in open(os.path.join(corpus, d, "train.jsonl"), encoding="utf-8"):
        text = json.loads(line)["text"]
        f.write(text.replace("\n", " ") + "\n")
        n += len(text)
        if n > 400_000:
          break
  spm.SentencePieceTrainer.train(
      input=sample, model_prefix=os.path.join(out_dir, "spm"), vocab_size=vocab_size,
      model_type="unigram", character_coverage=0.9995, pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, max_sentence_length=100000, hard_vocab_limit=False, minloglevel=2,
      num_threads=os.cpu_count() or 1)
  return os.path.join(out_dir, "spm.model"), time.perf_counter() - t0


def train_step_rate(batch: int, seq_len: int):
  """Train-step tokens/s at the same batch shape, or (None, why not)."""
  try:
    config = bench.throughput_config()
    config.train.global_batch_size = batch
    config.data.seq_len = seq_len
    return float(bench.train_step_tokens_per_sec(config)), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"train_step_tokens_per_sec failed: {type(e).__name__}: {e}"


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--corpora", default="", help="corpus dir ('' = $CPT_CORPORA or ../shared/corpora)")
  ap.add_argument("--domains", default="", help="comma-separated; '' = the first 5 domains")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--prefetch", type=int, default=4)
  ap.add_argument("--spm_vocab_size", type=int, default=8000)
  ap.add_argument("--no_spm", action="store_true")
  ap.add_argument("--gcs_steps", type=int, default=200, help="timed batches of the gcs row")
  ap.add_argument("--no_gcs", action="store_true",
                  help="skip the gcs row (stores on a local GCS emulator)")
  a = ap.parse_args()

  tmp = tempfile.mkdtemp(prefix="cpt_bench_")
  corpus = sources_lib.find_corpus_dir(a.corpora)
  note = None
  if not os.path.isdir(corpus):
    note = f"{corpus} missing; used the builtin stdlib corpus"
    corpus = builtin_corpus.write_stdlib_corpus(os.path.join(tmp, "stdlib"))
  available = sorted(d for d in os.listdir(corpus)
                     if os.path.isfile(os.path.join(corpus, d, "train.jsonl")))
  domains = config_lib.split_list(a.domains) or available[:5]

  cfg = byte_config(corpus, domains, a.seq_len, a.prefetch, os.path.join(tmp, "cache_byte"))
  byte = measure(cfg, a.batch, a.steps)
  missing = gcs_server.missing()
  if a.no_gcs or missing:
    gcs = {"skipped": "--no_gcs" if a.no_gcs else f"{', '.join(missing)} not installed"}
  else:
    gcs = measure_gcs(cfg, a.batch, a.gcs_steps, tmp)

  import jax  # pylint: disable=g-import-not-at-top
  result = {
      "tokens_per_sec": byte["tokens_per_sec_prefetch"],
      "train_step_device": str(jax.devices()[0].device_kind),
      "ratio_to_train_step": None,
      "train_step_tokens_per_sec": None,
      "goal_tokens_per_sec": 500_000,
      "batch": a.batch, "seq_len": a.seq_len, "steps": a.steps, "domains": domains,
      "corpus": corpus, "byte": byte,
      "tokens_per_sec_gcs_emulator": gcs.get("tokens_per_sec_prefetch"), "gcs": gcs,
  }
  rate, why = train_step_rate(a.batch, a.seq_len)
  if rate:
    result["train_step_tokens_per_sec"] = rate
    result["ratio_to_train_step"] = round(result["tokens_per_sec"] / rate, 3)
  else:
    result["ratio_note"] = why
  if not a.no_spm:
    model, train_s = train_spm(corpus, domains, tmp, a.spm_vocab_size)
    cfg.vocab = model
    cfg.cache_dir = os.path.join(tmp, "cache_spm")
    spm_res = measure(cfg, a.batch, a.steps)
    spm_res["spm_train_seconds"] = round(train_s, 2)
    spm_res["vocab_size"] = a.spm_vocab_size
    result["sentencepiece"] = spm_res
    result["tokens_per_sec_sentencepiece"] = spm_res["tokens_per_sec_prefetch"]
  if note:
    result["note"] = note
  shutil.rmtree(tmp, ignore_errors=True)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
