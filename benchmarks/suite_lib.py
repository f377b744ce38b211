"""The replay-selection benchmark behind benchmarks/cpt_suite.py (not part of the package).

Pretrains M on the old domains (cached under <cache>/pretrain-<hash of the
settings>), then runs CPT on the new domain from M for every (row, seed):
no replay; random at several fractions; every strategy at 1% and 5%; random
1% replay whose rows are also distilled from M ('+kd', objective.replay_kd);
random 5% replay + KL distillation with one old domain marked unavailable; and
"joint" (CPT on T plus *all* of D at its natural size weights: the
re-training upper bound, approximated by continuing from M). Every run sees
the same number of T tokens (steps = cpt_steps x (1 + r) / T's share) and the
same re-warmed cosine schedule shape. Each row is reported as mean and
standard deviation over seeds.

Dev / test: with `dev_share` > 0 each domain's validation documents are split
deterministically (`split_corpus`: rank by sha256 of the document id) into a
*dev* part, evaluated as the eval-only domain `<domain>__dev`, and a *test*
part, the domain's own validation split. A row's `dev_*` columns are what a
search may choose on (`search.py`); the other columns are test numbers.

A finished run's row is cached in <work>/row.json under a key: the hash of the
run's full config, its spec and seed, M's losses and the code version (the
package's sources and the JAX version). A different key re-runs the row from
scratch (the stale run directory is removed first, so nothing resumes from it).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import fnmatch
import functools
import glob
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from typing import Any

import jax
import numpy as np

from cpt_jax import stages
from cpt_jax import config as config_lib
from cpt_jax import data as data_lib


@dataclasses.dataclass
class Settings:
  corpora: str
  old: tuple[str, ...] = ("man_en", "code_py", "legal", "bible_kjv")
  new: str = "man_de"
  unavailable: str = "legal"  # old domain without train data in the distill row
  d_model: int = 128
  num_layers: int = 2
  seq_len: int = 128
  batch: int = 32
  pretrain_steps: int = 1900
  cpt_steps: int = 400
  lr: float = 3e-3
  cpt_lr: float = 2e-3
  seeds: int = 3
  random_fractions: tuple[float, ...] = (0.01, 0.05, 0.25)
  strategy_fractions: tuple[float, ...] = (0.01, 0.05)
  strategies: tuple[str, ...] = ("proportional", "teacher_loss", "forgetting", "diversity",
                                 "online")
  eval_batches: int = 8
  # Extra row groups: 'kd' (see kd_strategies), 'controllers' (rate controllers at a 5%
  # random replay fraction) and 'decomposition' (full / LoRA tau / sigma-tau routing
  # at that fraction).
  extras: tuple[str, ...] = ("kd",)
  controllers: tuple[str, ...] = ("doremi", "exp3", "forgetting")
  cache: str = ""
  workdir: str = ""
  only: str = ""  # comma-separated name globs: run only these rows
  # Runs in parallel, each in its own process pinned to one core with
  # single-threaded XLA (small models use cores better this way); 0 = one per core.
  workers: int = 0
  # The '+kd' rows: these strategies at kd_fraction with objective.replay_kd = kd_weight
  # (each replay row also distilled from M). The weight comes from one-seed pilots at
  # 600 T-steps (replay_kd 1 / 4, 2 with lambda_replay 2, lambda_replay 5 alone).
  kd_strategies: tuple[str, ...] = ("random",)
  kd_fraction: float = 0.01
  kd_weight: float = 4.0
  # Share of each domain's validation documents moved to its dev part (0: no split; every
  # column is then measured on the whole validation split).
  dev_share: float = 0.5

  def pretrain_key(self) -> str:
    blob = json.dumps([os.path.abspath(self.corpora), sorted(self.old), self.new, self.d_model,
                       self.num_layers, self.seq_len, self.batch, self.pretrain_steps, self.lr])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


DEV = "__dev"  # suffix of a domain's dev part (an eval-only domain)


def suite_domains(s: Settings) -> list[str]:
  return list(dict.fromkeys([*s.old, s.new]))


def dev_domains(s: Settings) -> list[str]:
  return [d + DEV for d in suite_domains(s)] if s.dev_share > 0 else []


def _doc_id(line: str, i: int) -> str:
  try:
    return str(json.loads(line).get("id", i))
  except (ValueError, AttributeError):
    return str(i)


def split_documents(lines: list[str], dev_share: float) -> tuple[list[str], list[str]]:
  """(dev, test) lines: ranked by sha256('cpt-suite:dev:' + id), the first round(n x share)
  go to dev (at least one to each part when n >= 2); each part keeps the file's order."""
  n = len(lines)
  rank = sorted(range(n), key=lambda i: hashlib.sha256(
      ("cpt-suite:dev:" + _doc_id(lines[i], i)).encode()).hexdigest())
  k = min(max(int(round(n * dev_share)), 1), n - 1) if n >= 2 else 0
  dev = set(rank[:k])
  return [l for i, l in enumerate(lines) if i in dev], [l for i, l in enumerate(lines)
                                                         if i not in dev]


def file_digest(path: str) -> str:
  """sha256 of a file's bytes: a cache key that survives a fresh copy of the same corpus."""
  h = hashlib.sha256()  # chunked: hashlib.file_digest is Python 3.11+, the package 3.10+
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def split_corpus(s: Settings) -> str:
  """The suite's corpus with dev / test parts (built once under <cache>, keyed by the source
  files' paths and contents, so that a fresh copy of the same corpus finds it); s.corpora if
  none.

  <d>/train.jsonl links to the original; <d>/validation.jsonl is the test part and
  <d>__dev/validation.jsonl the dev part (eval-only: no train file).
  """
  if s.dev_share <= 0:
    return s.corpora
  src = {d: os.path.join(s.corpora, d) for d in suite_domains(s)}
  stamp = []
  for d, folder in sorted(src.items()):
    for split in ("train", "validation"):
      path = os.path.join(folder, f"{split}.jsonl")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"cpt_suite: domain {d!r} has no {path}: the dev / test "
                                "split reads JSONL corpora (--dev-share 0 turns it off)")
      stamp.append([os.path.abspath(path), file_digest(path)])
  key = hashlib.sha256(json.dumps([stamp, s.dev_share]).encode()).hexdigest()[:12]
  out = os.path.join(s.cache, f"corpus-devtest-{key}")
  if os.path.isdir(out):
    return out
  tmp = f"{out}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  for d, folder in src.items():
    with open(os.path.join(folder, "validation.jsonl"), encoding="utf-8") as f:
      lines = [l if l.endswith("\n") else l + "\n" for l in f if l.strip()]
    dev, test = split_documents(lines, s.dev_share)
    for name, part in ((d, test), (d + DEV, dev)):
      os.makedirs(os.path.join(tmp, name), exist_ok=True)
      with open(os.path.join(tmp, name, "validation.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(part)
    os.symlink(os.path.abspath(os.path.join(folder, "train.jsonl")),
               os.path.join(tmp, d, "train.jsonl"))
  try:
    os.rename(tmp, out)
  except OSError:  # another process built it first
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def quick(settings: Settings, rows: bool = True) -> Settings:
  """--quick: a small model, short runs, one seed; rows=True: the 5% column only."""
  s = dataclasses.replace(settings, d_model=64, num_layers=1, seq_len=64, batch=16,
                          pretrain_steps=200, cpt_steps=80, seeds=1, eval_batches=4)
  if rows:
    s = dataclasses.replace(s, random_fractions=(0.05,), strategy_fractions=(0.05,),
                            kd_fraction=0.05)
  return s


# Random replay's fractions for the Pareto curve (--random-fractions pareto).
PARETO_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25)


# The row groups both presets draw from (each preset's `only` picks its rows): random 1% /
# 5%, online 1%, and online 1% with replay KD.
_PRESET_ROWS = dict(random_fractions=(0.01, 0.05), strategies=("online",),
                    strategy_fractions=(0.01,), extras=("kd",), kd_strategies=("online",),
                    kd_fraction=0.01)


def gpu_preset(settings: Settings) -> Settings:
  """--preset gpu: 34M parameters (d 512, 8 layers, rows of 512 bytes), 2 seeds, the rows
  that matter: no replay, random 1% / 5%, online 1% with and without replay KD.

  Sized for about 10 minutes on one H100/H200 (runs one after another: workers 1).
  """
  return dataclasses.replace(
      settings, d_model=512, num_layers=8, seq_len=512, batch=32, pretrain_steps=3000,
      cpt_steps=800, lr=1e-3, cpt_lr=6e-4, seeds=2, **_PRESET_ROWS,
      only="no_replay,random_0.01,random_0.05,online_0.01,online_0.01+kd*", workers=1)


def mid_preset(settings: Settings) -> Settings:
  """--preset mid: 4.4M parameters (d 256, 4 layers; 7x the default), otherwise the
  default scale (rows of 128 bytes, batch 32, M 1,900 steps, 400 T-steps), 1 seed, the
  rows that say whether the default scale's ranking moves with capacity: random 1% / 5%
  and online 1% with replay KD (`--add-rows` adds a chosen configuration).

  A step between the default scale and --preset gpu that a 2-core CPU runs in about an
  hour (learning rates scaled down with width, as in --preset gpu).
  """
  return dataclasses.replace(
      settings, d_model=256, num_layers=4, lr=2e-3, cpt_lr=1.5e-3, seeds=1, **_PRESET_ROWS,
      only="random_0.01,random_0.05,online_0.01+kd*")


# --preset NAME: a function of the Settings (cpt_suite.py's --preset choices).
PRESETS = {"gpu": gpu_preset, "mid": mid_preset}


def base_config(s: Settings):
  c = config_lib.default_config()
  c.model.update(d_model=s.d_model, num_layers=s.num_layers, num_heads=4, num_kv_heads=4,
                 mlp_dim=4 * s.d_model)
  c.data.update(corpus_dir=s.corpora, seq_len=s.seq_len, prefetch=2,
                cache_dir=os.path.join(s.cache, "data"))
  c.train.update(global_batch_size=s.batch, log_every=50, eval_batches=s.eval_batches,
                 checkpoint_every=10**9, progress_bar=False, async_checkpoints=False,
                 keep_checkpoints=1, peak_flops=1e11)
  c.optimizer.update(lr=s.lr, warmup_steps=max(s.pretrain_steps // 20, 1))
  return c


def pretrain(s: Settings) -> tuple[str, dict]:
  """M's checkpoint dir and its per-domain validation losses (cached)."""
  work = os.path.join(s.cache, f"pretrain-{s.pretrain_key()}")
  done = os.path.join(work, "m_eval.json")
  if os.path.isfile(done):
    with open(done) as f:
      return os.path.join(work, "checkpoints"), json.load(f)
  c = base_config(s)
  c.data.update(new=",".join(s.old), eval=",".join([s.new, *dev_domains(s)]))
  c.train.steps = s.pretrain_steps
  summary = stages.train(c, work, devices=jax.devices()[:1])
  losses = {d: v["loss"] for d, v in summary["eval"].items()}
  with open(done, "w") as f:
    json.dump(losses, f)
  return os.path.join(work, "checkpoints"), losses


def run_specs(s: Settings) -> list[dict]:
  specs = [{"name": "no_replay", "strategy": "", "fraction": 0.0}]
  specs += [{"name": f"random_{f:g}", "strategy": "random", "fraction": f}
            for f in s.random_fractions]
  specs += [{"name": f"{st}_{f:g}", "strategy": st, "fraction": f}
            for st in s.strategies for f in s.strategy_fractions]
  specs += [{"name": "random_0.05+distill", "strategy": "random", "fraction": 0.05,
             "distill": True},
            {"name": "joint", "strategy": "", "fraction": None}]
  if "kd" in s.extras:  # replay rows also distilled from M (objective.replay_kd)
    f = s.kd_fraction
    tag = "+kd" if s.kd_weight == Settings.kd_weight else f"+kd{s.kd_weight:g}"
    specs += [{"name": f"{st}_{f:g}{tag}", "strategy": st, "fraction": f,
               "replay_kd": s.kd_weight} for st in s.kd_strategies]
  if "controllers" in s.extras:
    specs += [{"name": f"random_0.05+{c}", "strategy": "random", "fraction": 0.05,
               "controller": c} for c in s.controllers]
  if "decomposition" in s.extras:
    specs += [{"name": f"random_0.05+{name}", "strategy": "random", "fraction": 0.05,
               "overrides": overrides}
              for name, overrides in decomposition_variants().items()]
  return specs


def decomposition_variants() -> dict[str, dict[str, Any]]:
  """Config overrides (`group.key: value`) for the CPT-suite comparison rows.

  full               every parameter trained on every row (no decomposition)
  lora_tau           sigma frozen; LoRA tau on attn q/v + MLP trained on all rows
  sigma_tau_routing  LoRA tau <- new rows, sigma <- replay/distill rows
  """
  lora = {"decomposition.mode": "lora",
          "decomposition.targets": r"(attn/(q|v)|mlp/(gate|up|down))/kernel",
          "decomposition.lora_rank": 8, "decomposition.lora_alpha": 16.0}
  return {
      "full": {"decomposition.mode": ""},
      "lora_tau": {**lora, "decomposition.routing": False, "decomposition.freeze_sigma": True},
      "sigma_tau_routing": {**lora, "decomposition.routing": True,
                            "decomposition.freeze_sigma": False},
  }


def source_hash(root: str) -> str:
  """Hash of the *.py files under `root` (relative paths and contents)."""
  h = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
    h.update(os.path.relpath(path, root).encode() + b"\0")
    with open(path, "rb") as f:
      h.update(f.read() + b"\0")
  return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def code_version() -> str:
  """The code a row ran with: cpt_jax's sources (cpt_jax/**/*.py), this file, JAX's version."""
  here = os.path.abspath(__file__)
  package = os.path.join(os.path.dirname(os.path.dirname(here)), "cpt_jax")
  with open(here, "rb") as f:
    own = hashlib.sha256(f.read()).hexdigest()[:8]
  return f"{source_hash(package)}-{own}-jax{jax.__version__}"


def row_key(s: Settings, spec: dict, seed: int, ckpt: str, m_loss: dict,
            pools: dict[str, int]) -> str:
  """Cache key of one run's row: its full config, spec, seed, M's losses, code version."""
  c = cpt_config(s, spec, ckpt, seed, pools)
  blob = json.dumps({"config": json.loads(c.to_json_best_effort(sort_keys=True)),
                     "spec": spec, "seed": seed, "old": list(s.old), "new": s.new,
                     "m_loss": m_loss, "code": code_version()}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_row(work: str, key: str) -> dict | None:
  """The row in <work>/row.json when it was written under `key`, else None."""
  path = os.path.join(work, "row.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    row = json.load(f)
  return row if row.get("cache_key") == key else None


def select_specs(specs: list[dict], only: str) -> list[dict]:
  """Keeps the specs whose name matches one of the comma-separated globs in `only`."""
  pats = [p.strip() for p in only.split(",") if p.strip()]
  return [sp for sp in specs if not pats or any(fnmatch.fnmatchcase(sp["name"], p)
                                                 for p in pats)]


def cpt_config(s: Settings, spec: dict, ckpt: str, seed: int, pool_rows: dict[str, int]):
  c = base_config(s)
  old = list(s.old)
  distill = spec.get("distill", False)
  replay = [d for d in old if not (distill and d == s.unavailable)]
  c.seed = seed
  c.data.seed = seed
  c.data.new = s.new
  c.optimizer.update(schedule="rewarm_cosine", lr=s.cpt_lr, init_lr=s.cpt_lr / 10,
                     warmup_steps=max(s.cpt_steps // 30, 1))
  c.train.init_checkpoint = ckpt
  frac = spec["fraction"]
  t_share = 1.0
  if spec["name"] == "joint":
    c.data.replay = ",".join(old)
    t_rows, d_rows = pool_rows[s.new], sum(pool_rows[d] for d in old)
    frac = d_rows / t_rows
  elif spec["strategy"]:
    c.data.replay = ",".join(replay)
    c.replay.update(strategy=spec["strategy"], fraction=frac)
    c.replay.online_every = max(s.cpt_steps // 6, 1)
  if distill:
    c.data.distill = s.unavailable
    c.objective.lambda_kd = 1.0
    t_share = 0.9  # T : distill = 0.9 : 0.1 among the non-replay domains
    c.data.weights = f"{s.new}=0.9,{s.unavailable}=0.1," + ",".join(f"{d}=1" for d in replay)
  if spec.get("controller"):
    # The controller moves weights inside the same replay share: replay + distill
    # at most r / (1 + r) of the rows (max_old_share), T at least the rest.
    share = frac / (1.0 + frac)
    c.mixing.update(controller=spec["controller"], update_every=c.train.log_every,
                    max_old_share=share, new_min_share=1.0 - share)
  if spec.get("replay_kd"):
    c.objective.replay_kd = spec["replay_kd"]
  for key, value in spec.get("overrides", {}).items():
    group, name = key.split(".")
    c[group][name] = value
  if c.replay.strategy == "steered":  # every refresh reads a new window's replay losses
    c.train.log_every = min(c.train.log_every, c.replay.online_every)
  trained = set((c.data.replay + "," + c.data.distill).split(","))
  # Every old domain is evaluated (its test part), and every domain's dev part.
  c.data.eval = ",".join([d for d in old if d not in trained] + dev_domains(s))
  steps = s.cpt_steps * (1 + (frac or 0.0) * t_share) / t_share
  c.train.steps = int(round(steps))
  return c


def _pool_rows(s: Settings) -> dict[str, int]:
  c = base_config(s)
  c.data.update(new=s.new, replay=",".join(s.old), prefetch=0, eval="")
  with data_lib.make_pipeline(c.data, global_batch_size=s.batch) as pipe:
    return {d: int(pipe.full_training_store(d).num_rows) for d in pipe.domains}


@dataclasses.dataclass
class Bench:
  """What every CPT run of a suite shares: settings (on the dev/test corpus), M, pools."""
  s: Settings
  ckpt: str
  m_loss: dict
  pools: dict
  workdir: str
  source: str  # the corpora as given (s.corpora is the dev/test copy)


def prepare(s: Settings, log=print) -> Bench:
  """Builds the dev/test corpus and M (both cached); the pools' row counts."""
  os.makedirs(s.cache, exist_ok=True)
  source = s.corpora
  s = dataclasses.replace(s, corpora=split_corpus(s))
  workdir = s.workdir or os.path.join(s.cache, f"cpt-{s.pretrain_key()}-{s.cpt_steps}")
  t0 = time.time()
  ckpt, m_loss = pretrain(s)
  log(f"M ready in {time.time() - t0:.0f}s: " + ", ".join(f"{d} {v:.3f}" for d, v in
                                                            m_loss.items()))
  return Bench(s, ckpt, m_loss, _pool_rows(s), workdir, source)


def run_rows(b: Bench, jobs: list[tuple[dict, int]], log=print) -> list[dict]:
  """The rows of (spec, seed) jobs, in order: cached ones reused, the others run."""
  s, ckpt, m_loss, pools = b.s, b.ckpt, b.m_loss, b.pools
  jobs = [(spec, seed, os.path.join(b.workdir, f"{spec['name']}-s{seed}"))
          for spec, seed in jobs]
  done: dict[str, dict] = {}
  todo = []
  for spec, seed, work in jobs:
    key = row_key(s, spec, seed, ckpt, m_loss, pools)
    row = cached_row(work, key)
    if row is not None:
      done[work] = row
    else:
      todo.append((spec, seed, work, key))

  def report(row):
    log(f"{row['name']} seed {row['seed']}: forgetting {row['mean_forgetting']:.3f} gain "
        f"{row['new_gain']:.3f} selection {row['selection_tflops']:.4f} TF of "
        f"{row['total_tflops']:.3f} TF, {row['seconds']:.0f}s")

  workers = min(s.workers or len(os.sched_getaffinity(0)), len(os.sched_getaffinity(0)))
  t_runs = time.time()
  if workers <= 1 or len(todo) <= 1:
    for spec, seed, work, key in todo:
      done[work] = run_one(s, spec, seed, work, ckpt, m_loss, pools, key)
      report(done[work])
  else:
    done.update(_run_parallel(s, todo, ckpt, m_loss, pools, workers, report))
  log(f"{len(todo)} runs in {time.time() - t_runs:.0f}s with {min(workers, max(len(todo), 1))} "
      f"worker(s); {len(jobs) - len(todo)} reused")
  return [done[work] for _, _, work in jobs]


def run_suite(s: Settings, log=print, extra_specs: tuple[dict, ...] = ()) -> dict[str, Any]:
  """Runs (or reuses finished) runs; returns {'settings', 'm_loss', 'rows', 'table'}.

  extra_specs: rows beside the grid (e.g. a search's chosen configuration).
  """
  b = prepare(s, log)
  specs = select_specs(run_specs(s), s.only) + list(extra_specs)
  rows = run_rows(b, [(spec, seed) for spec in specs for seed in range(s.seeds)], log)
  return {"settings": dict(dataclasses.asdict(b.s), source_corpora=b.source),
          "m_loss": b.m_loss, "rows": rows, "table": aggregate(rows)}


def run_one(s: Settings, spec: dict, seed: int, work: str, ckpt: str, m_loss: dict,
            pools: dict[str, int], key: str) -> dict:
  """One CPT run; its row is also written to <work>/row.json (the cache, under `key`).

  A run directory started under another key (or none) is removed first; one
  started under this key (an interrupted run) is resumed.
  """
  key_file = os.path.join(work, "row_key")
  started = ""
  if os.path.isfile(key_file):
    with open(key_file) as f:
      started = f.read().strip()
  if os.path.exists(work) and started != key:
    shutil.rmtree(work)
  os.makedirs(work, exist_ok=True)
  with open(key_file, "w") as f:
    f.write(key)
  c = cpt_config(s, spec, ckpt, seed, pools)
  summary = stages.train(c, work, devices=jax.devices()[:1])
  row = result_row(s, spec, seed, summary, m_loss, c.replay.selection_fraction)
  row["cache_key"] = key
  with open(os.path.join(work, "row.json"), "w") as f:
    json.dump(row, f)
  return row


def _pin_worker(cores) -> None:
  """Process-pool initializer: one core, single-threaded XLA (before JAX starts)."""
  core = cores.get()
  os.sched_setaffinity(0, {core})
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                             "false intra_op_parallelism_threads=1").strip()


def _run_parallel(s, todo, ckpt, m_loss, pools, workers, report) -> dict[str, dict]:
  """Runs `todo` in `workers` spawned processes, longest runs first."""
  ctx = mp.get_context("spawn")  # a fresh interpreter: JAX must not be initialised yet
  cores = ctx.Manager().Queue()
  for i, core in enumerate(sorted(os.sched_getaffinity(0))):
    if i < workers:
      cores.put(core)
  order = sorted(todo, key=lambda job: -cpt_config(s, job[0], ckpt, job[1], pools).train.steps)
  out = {}
  with cf.ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_pin_worker,
                              initargs=(cores,)) as ex:
    futs = {ex.submit(run_one, s, spec, seed, work, ckpt, m_loss, pools, key): work
            for spec, seed, work, key in order}
    try:
      for fut in cf.as_completed(futs):
        out[futs[fut]] = fut.result()
        report(out[futs[fut]])
    except BaseException:
      ex.shutdown(wait=False, cancel_futures=True)  # finished rows stay cached
      raise
  return out


def result_row(s: Settings, spec: dict, seed: int, summary: dict, m_loss: dict,
               selection_fraction: float = 0.0) -> dict:
  """One run's record; t_tokens / t_rows (T trained on) and replay_tokens show the fairness."""
  ev = {d: v["loss"] for d, v in summary["eval"].items()}
  old_loss = {d: ev[d] for d in s.old}
  forgetting = {d: ev[d] - m_loss[d] for d in s.old}
  dev = {}
  if s.dev_share > 0:  # the columns a search may choose on
    dev_forgetting = {d: ev[d + DEV] - m_loss[d + DEV] for d in s.old}
    dev = {"dev_forgetting": dev_forgetting,
           "dev_mean_forgetting": float(np.mean(list(dev_forgetting.values()))),
           "dev_new_gain": m_loss[s.new + DEV] - ev[s.new + DEV]}
  sel = summary.get("selection") or {}
  sel_tf = float(sel.get("tflops", 0.0))
  # train steps, teacher forwards, second pull-backs (projection, subtree sigma / tau), the
  # EWC Fisher pass, selection
  train_tf = summary["train_tflops"] + summary["teacher_tflops"] + \
      float(summary.get("pullback_tflops", 0.0)) + float(summary.get("fisher_tflops", 0.0))
  tok = summary["data"]["tokens_per_role"]
  replay_frac = tok.get("replay", 0) / max(tok.get("new", 1), 1)
  return {"name": spec["name"], "strategy": spec["strategy"] or spec["name"], "seed": seed,
          "replay_fraction": spec["fraction"] if spec["fraction"] is not None else replay_frac,
          "replay_fraction_actual": replay_frac, "old_loss": old_loss, "forgetting": forgetting,
          "mean_forgetting": float(np.mean(list(forgetting.values()))),
          "new_loss": ev[s.new], "new_gain": m_loss[s.new] - ev[s.new],
          "t_tokens": int(tok.get("new", 0)),
          "t_rows": int(summary["data"].get("rows_per_domain", {}).get(s.new, 0)),
          "replay_tokens": int(tok.get("replay", 0)),
          "selection_tflops": sel_tf, "selection_fraction": selection_fraction,
          "teacher_tflops": summary["teacher_tflops"],
          "total_tflops": train_tf + sel_tf,
          "selection_share": sel_tf / max(train_tf + sel_tf, 1e-30),
          "selection_seconds": float(sel.get("seconds", 0.0)), "steps": summary["steps_run"],
          "buffer_rows": sel.get("buffer_rows"), "seconds": summary["seconds"],
          "seconds_per_step": summary["seconds"] / max(summary["steps_run"], 1),
          "trainable_params": summary.get("state_bytes", {}).get("trainable_params"),
          "optimizer_bytes": sum(summary.get("state_bytes", {}).get("opt_state", {}).values()),
          **dev}


def aggregate(rows: list[dict]) -> list[dict]:
  out = []
  for name in dict.fromkeys(r["name"] for r in rows):
    rs = [r for r in rows if r["name"] == name]
    agg = {"name": name, "seeds": len(rs), "replay_fraction": rs[0]["replay_fraction"],
           "buffer_rows": rs[0]["buffer_rows"]}
    agg["trainable_params"] = rs[0].get("trainable_params")
    agg["optimizer_bytes"] = rs[0].get("optimizer_bytes")
    keys = ["mean_forgetting", "new_gain", "selection_tflops", "teacher_tflops", "total_tflops",
            "selection_share", "seconds", "seconds_per_step", "replay_tokens"]
    keys += [k for k in ("dev_mean_forgetting", "dev_new_gain") if k in rs[0]]
    for k in keys:
      v = np.array([r.get(k, 0.0) for r in rs], np.float64)
      agg[k], agg[k + "_std"] = float(v.mean()), float(v.std(ddof=1) if v.size > 1 else 0.0)
    agg["old_loss"] = {d: float(np.mean([r["old_loss"][d] for r in rs]))
                       for d in rs[0]["old_loss"]}
    out.append(agg)
  return out


def format_table(table: list[dict]) -> str:
  """The markdown table; forgetting and gain are test numbers, the dev columns follow."""
  dev = any("dev_mean_forgetting" in r for r in table)
  beats = any("beats_random_at" in r for r in table)  # set by suite_pareto.pareto
  head = ("| run | replay | buffer rows | mean forgetting | gain on T | "
          + ("dev forgetting | dev gain | " if dev else "")
          + "selection TF | teacher TF | total TF | selection % | seconds | s/step | "
          "trainable params | optimizer MB |" + (" beats random at |" if beats else ""))
  lines = [head, "|" + "---|" * (13 + 2 * dev + beats)]
  for r in table:
    fr = r["replay_fraction"]
    dev_cols = (f"{r.get('dev_mean_forgetting', float('nan')):.3f} | "
                f"{r.get('dev_new_gain', float('nan')):.3f} | ") if dev else ""
    lines.append(
        f"| {r['name']} | {fr:.3g} | {r['buffer_rows'] or '-'} | "
        f"{r['mean_forgetting']:.3f} ± {r['mean_forgetting_std']:.3f} | "
        f"{r['new_gain']:.3f} ± {r['new_gain_std']:.3f} | {dev_cols}"
        f"{r['selection_tflops']:.4f} | {r.get('teacher_tflops', 0.0):.4f} | "
        f"{r['total_tflops']:.2f} | {100 * r['selection_share']:.2f} | {r['seconds']:.0f} | "
        f"{r.get('seconds_per_step', 0.0):.3f} | {r.get('trainable_params') or '-'} | "
        f"{(r.get('optimizer_bytes') or 0) / 2**20:.1f} |"
        + (f" {', '.join(f'{100 * b:g}%' for b in r.get('beats_random_at', [])) or '-'} |"
           if beats else ""))
  return "\n".join(lines)
