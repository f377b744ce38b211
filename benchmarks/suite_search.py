"""Hyperparameter search for the replay-selection suite, on dev columns only.

  python benchmarks/cpt_suite.py --corpora DIR --json OUT --search 24 [--search-grid G.json]

Successive halving over seeds: rung i runs every surviving candidate on seed i,
ranks the candidates by their dev score averaged over the seeds run so far and
keeps the better half (rounded up). It stops when one candidate is left, when
every seed (`Settings.seeds`) is used, or when the next rung would pass the
budget of N runs. The reference row (random replay at `REF_FRACTION`) runs on
the same seeds and counts in N, so N >= len(grid) + 1 is needed for rung 0.

dev score (lower is better), from the dev parts of the validation text only:

  dev_mean_forgetting
    + GAIN_PENALTY * max(0, ref_dev_gain - (GAIN_MARGIN - GAIN_SAFETY) - dev_new_gain)

i.e. forgetting, plus a penalty when the gain on T falls more than GAIN_MARGIN -
GAIN_SAFETY below the reference's. GAIN_MARGIN is the goal's margin; GAIN_SAFETY
starts the penalty that much before it, so that a candidate whose dev gain sits on
the margin is not chosen to land on either side of it on test by the seeds' luck
(0.003 is about the seed-to-seed standard deviation of the reference's dev gain
on the shared corpora, 0.001-0.005). Test columns never enter it. The candidate
ranked first after the last rung is the chosen configuration (written to OUT's
`search` entry and to <OUT>.chosen.json, which `--add-rows` reads).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import numpy as np

import suite_lib as suite

REF_FRACTION = 0.05
GAIN_MARGIN = 0.01
GAIN_SAFETY = 0.003
GAIN_PENALTY = 10.0


def default_grid(s: suite.Settings) -> list[dict]:
  """The 1% candidates, all with replay KD: `online` around the reference's setting (KD
  weight 4, temperature 1, a refresh every cpt_steps / 6, swap 0.25) varied one knob at a
  time (KD weight 2, temperature 2, refresh every cpt_steps / 12, swap 0.5, per-domain
  quotas 0.5), `gradient` with T's sign / mean direction, `steered` (quota 0.5 / 1, swap
  0.25 / 0) and `dro` (temperature 0.25 / 1)."""
  every, fast = max(s.cpt_steps // 6, 1), max(s.cpt_steps // 12, 1)
  # (replay_kd, kd_temperature, online_every, online_swap, online_quota); names spell them
  # all, so that no candidate shares a run directory with a suite row.
  online = [(4.0, 1.0, every, 0.25, 0.0), (2.0, 1.0, every, 0.25, 0.0),
            (4.0, 2.0, every, 0.25, 0.0), (4.0, 1.0, fast, 0.25, 0.0),
            (4.0, 1.0, every, 0.5, 0.0), (4.0, 1.0, every, 0.25, 0.5)]
  out = [{"name": f"online_0.01+kd{kd:g}_t{t:g}_e{e}_w{w:g}_q{q:g}", "strategy": "online",
          "fraction": 0.01, "replay_kd": kd,
          "overrides": {"objective.kd_temperature": t, "replay.online_every": e,
                        "replay.online_swap": w, "replay.online_quota": q}}
         for kd, t, e, w, q in online]
  out += [{"name": f"gradient_0.01+kd4_{tag}", "strategy": "gradient", "fraction": 0.01,
           "replay_kd": 4.0, "overrides": {"replay.grad_sign": sign}}
          for tag, sign in (("sign", True), ("mean", False))]
  # steered: zero-FLOP refreshes from the replay rows' training loss (quota strength,
  # rotation); dro: IR-DRO draws at two temperatures (nats per token).
  out += [{"name": f"steered_0.01+kd4_e{every}_q{q:g}_w{w:g}", "strategy": "steered",
           "fraction": 0.01, "replay_kd": 4.0,
           "overrides": {"replay.online_every": every, "replay.steer_quota": q,
                         "replay.online_swap": w}}
          for q, w in ((0.5, 0.25), (0.5, 0.0), (1.0, 0.25))]
  out += [{"name": f"dro_0.01+kd4_t{t:g}", "strategy": "dro", "fraction": 0.01,
           "replay_kd": 4.0, "overrides": {"replay.dro_temperature": t}}
          for t in (0.25, 1.0)]
  return out


def read_grid(path: str) -> list[dict]:
  """A grid file: a JSON list of specs {name, strategy, fraction[, replay_kd, overrides]}."""
  with open(path, encoding="utf-8") as f:
    grid = json.load(f)
  if not isinstance(grid, list) or not grid:
    raise ValueError(f"--search-grid {path}: expected a non-empty JSON list of row specs")
  for i, g in enumerate(grid):
    missing = {"name", "strategy", "fraction"} - set(g)
    if missing:
      raise ValueError(f"--search-grid {path}: entry {i} lacks {sorted(missing)}")
  if len({g["name"] for g in grid}) != len(grid):
    raise ValueError(f"--search-grid {path}: row names must be unique")
  return grid


def penalty_start() -> float:
  """How far the dev gain may fall below the reference's before the penalty starts."""
  return GAIN_MARGIN - GAIN_SAFETY


def dev_score(dev_forgetting: float, dev_gain: float, ref_dev_gain: float) -> float:
  """See the module docstring (lower is better)."""
  return dev_forgetting + GAIN_PENALTY * max(0.0, ref_dev_gain - penalty_start() - dev_gain)


def successive_halving(grid: list[dict], max_runs: int, seeds: int,
                       run: Callable[[list[tuple[dict, int]]], list[dict]],
                       ref: dict) -> dict:
  """Runs the search; run(jobs) -> rows (one per (spec, seed) job, with dev columns)."""
  if max_runs < len(grid) + 1:
    raise ValueError(f"--search {max_runs}: rung 0 needs {len(grid) + 1} runs (the "
                     f"{len(grid)} candidates and the reference on seed 0)")
  alive = list(grid)
  rows: dict[str, list[dict]] = {g["name"]: [] for g in grid}
  ref_rows: list[dict] = []
  rungs, used = [], 0
  for seed in range(seeds):
    if (len(alive) <= 1 and rungs) or used + len(alive) + 1 > max_runs:
      break
    got = run([(g, seed) for g in alive] + [(ref, seed)])
    used += len(alive) + 1
    for g, r in zip(alive, got):
      rows[g["name"]].append(r)
    ref_rows.append(got[-1])
    ref_gain = float(np.mean([r["dev_new_gain"] for r in ref_rows]))
    scores = {}
    for g in alive:
      rs = rows[g["name"]]
      scores[g["name"]] = dev_score(float(np.mean([r["dev_mean_forgetting"] for r in rs])),
                                    float(np.mean([r["dev_new_gain"] for r in rs])), ref_gain)
    alive = sorted(alive, key=lambda g: (scores[g["name"]], g["name"]))
    alive = alive[:max(1, math.ceil(len(alive) / 2))] if seed + 1 < seeds else alive
    rungs.append({"seed": seed, "ref_dev_gain": ref_gain, "dev_scores": scores,
                  "kept": [g["name"] for g in alive]})
  chosen = alive[0]
  return {"chosen": chosen, "rungs": rungs, "runs": used, "max_runs": max_runs,
          "dev_score": "dev_mean_forgetting + %g * max(0, ref_dev_gain - %g - dev_new_gain)"
                       % (GAIN_PENALTY, penalty_start()),
          "reference": ref["name"], "grid": grid}


def search(s: suite.Settings, grid: list[dict], max_runs: int, log=print) -> dict:
  """The search on the suite's dev columns; {'search', 'rows', 'table', ...} like run_suite."""
  if s.dev_share <= 0:
    raise ValueError("--search chooses on dev columns: it needs --dev-share > 0")
  b = suite.prepare(s, log)
  ref = {"name": f"random_{REF_FRACTION:g}", "strategy": "random", "fraction": REF_FRACTION}
  all_rows: list[dict] = []

  def run(jobs):
    got = suite.run_rows(b, jobs, log)
    all_rows.extend(got)
    return got

  result = successive_halving(grid, max_runs, s.seeds, run, ref)
  log(f"search: chose {result['chosen']['name']} after {result['runs']} runs "
      f"({len(result['rungs'])} rungs)")
  return {"settings": dict(dataclasses.asdict(b.s), source_corpora=b.source),
          "m_loss": b.m_loss, "rows": all_rows, "table": suite.aggregate(all_rows),
          "search": result}
