r"""Finished suite runs merged back toward M: forgetting against gain along the line
theta(a) = M + a (theta - M), a in [0, 1] (a = 1: the run's own model; a = 0: M).

  python benchmarks/suite_interpolate.py --runs CACHE/cpt-<M's key>-<cpt steps> \
      --rows 'random_0.01,random_0.05' --alphas 1,0.95,0.9,0.8 --json OUT

Merging a continued model with the one it started from is the cheapest lever against
forgetting the literature offers (post-hoc interpolation, WiSE-FT, Wortsman et al., CVPR
2022; iterated during continued pre-training as Branch-and-Merge, Alexandrov et al., EMNLP
Findings 2024): no training FLOPs, one evaluation per point. `--runs` is the folder of a
suite's run directories (`<row name>-s<seed>`, each with its final checkpoint and row.json,
cpt_suite.py); every seed found of each `--rows` name is read. Each point is evaluated on the
run's own eval domains (test parts and `__dev` parts) against M evaluated the same way, so
a = 1 reproduces the run's row (`check`: the largest difference from row.json's columns).
With `--reference NAME` (random 5%: the search's reference row, in the same folder) each
row's `chosen_alpha` is the a with the lowest dev score (suite_search.dev_score against the
reference's dev gain at a = 1, averaged over the seeds): a choice made on dev columns only,
like the search's. Prints a markdown table; OUT holds {row: {alpha: mean and std over
seeds}, chosen_alpha}.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import suite_search  # pylint: disable=wrong-import-position

from cpt_jax.train import context as context_lib  # pylint: disable=wrong-import-position
from cpt_jax.train import trainer as trainer_lib  # pylint: disable=wrong-import-position

DEV = "__dev"
COLUMNS = ("mean_forgetting", "new_gain", "dev_mean_forgetting", "dev_new_gain")


def run_dirs(runs: str, name: str) -> list[str]:
  """`<runs>/<name>-s<seed>` folders that hold a finished row (row.json), by seed."""
  found = [d for d in glob.glob(os.path.join(runs, f"{glob.escape(name)}-s*"))
           if os.path.isfile(os.path.join(d, "row.json"))]
  if not found:
    raise FileNotFoundError(f"--rows {name}: no finished run (<name>-s<seed>/row.json) in {runs}")
  return sorted(found, key=lambda d: int(d.rsplit("-s", 1)[1]))


def columns(ev: dict[str, float], m: dict[str, float], old: list[str], new: str) -> dict:
  """The suite's columns (suite_lib.result_row) of losses `ev` against M's losses `m`."""
  out = {"mean_forgetting": float(np.mean([ev[d] - m[d] for d in old])),
         "new_gain": m[new] - ev[new]}
  if new + DEV in ev:
    out["dev_mean_forgetting"] = float(np.mean([ev[d + DEV] - m[d + DEV] for d in old]))
    out["dev_new_gain"] = m[new + DEV] - ev[new + DEV]
  return out


def interpolate_run(run_dir: str, alphas: list[float]) -> dict:
  """{'points': {alpha: columns}, 'check': max |a=1 columns - row.json's|} for one run."""
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(run_dir, "row.json"), encoding="utf-8") as f:
    row = json.load(f)
  old, new = list(row["forgetting"]), config.data.new
  with tempfile.TemporaryDirectory() as work:  # the run's folder stays untouched
    t = trainer_lib.Trainer(config, work, devices=jax.devices()[:1])
    try:
      start = t.reference_params()  # M: the run's train.init_checkpoint
      final_cfg = ml_collections.ConfigDict(config.to_dict())
      final_cfg.train.init_checkpoint = os.path.join(run_dir, "checkpoints")
      final, _ = context_lib.starting_params(dataclasses.replace(t.ctx, config=final_cfg))
      domains = list(t.pipeline.domains)
      m = {d: v["loss"] for d, v in t.evaluate(start, domains).items()}
      points = {}
      for a in alphas:
        params = jax.tree.map(lambda x, y, a=a: y + a * (x - y), final, start)
        ev = {d: v["loss"] for d, v in t.evaluate(params, domains).items()}
        points[a] = columns(ev, m, old, new)
    finally:
      t.close()
  own = {k: row[k] for k in COLUMNS if k in row}
  check = max(abs(points[1.0][k] - own[k]) for k in own) if 1.0 in points else None
  return {"points": points, "check": check, "total_tflops": row["total_tflops"],
          "replay_tokens": row["replay_tokens"]}


def summarize(per_seed: list[dict], alphas: list[float]) -> dict:
  """{alpha: {column: mean, column_std: std}} over seeds."""
  out = {}
  for a in alphas:
    pts = [r["points"][a] for r in per_seed]
    out[a] = {}
    for k in COLUMNS:
      if k in pts[0]:
        vals = [p[k] for p in pts]
        out[a][k], out[a][k + "_std"] = float(np.mean(vals)), float(np.std(vals))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", required=True, help="folder of the suite's <row>-s<seed> run dirs")
  p.add_argument("--rows", required=True, help="comma-separated row names")
  p.add_argument("--alphas", default="1,0.95,0.9,0.85,0.8",
                 help="comma-separated a in [0, 1]: M + a (theta - M)")
  p.add_argument("--reference", default="",
                 help="row whose dev gain (unmerged) the dev score compares with, e.g. random_0.05")
  p.add_argument("--json", required=True, help="output JSON path")
  a = p.parse_args(argv)
  alphas = [float(x) for x in a.alphas.split(",")]
  bad = [x for x in alphas if not 0.0 <= x <= 1.0]
  if bad:
    raise SystemExit(f"--alphas: {bad} outside [0, 1]")
  names = [n for n in a.rows.split(",") if n]
  try:  # every name found before any evaluation
    dirs = {n: run_dirs(a.runs, n) for n in names}
    ref_dirs = run_dirs(a.runs, a.reference) if a.reference else []
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from None
  ref_gain = None
  if ref_dirs:
    ref_rows = []
    for d in ref_dirs:
      with open(os.path.join(d, "row.json"), encoding="utf-8") as f:
        ref_rows.append(json.load(f))
    ref_gain = float(np.mean([r["dev_new_gain"] for r in ref_rows]))
  out = {}
  lines = ["| row | a | forgetting | gain on T | dev forgetting | dev gain | total TF |",
           "|---|---|---|---|---|---|---|"]
  for n in names:
    per_seed = [interpolate_run(d, alphas) for d in dirs[n]]
    summary = summarize(per_seed, alphas)
    checks = [r["check"] for r in per_seed if r["check"] is not None]
    out[n] = {"seeds": [os.path.basename(d) for d in dirs[n]], "alphas": summary,
              "check": max(checks) if checks else None,
              "total_tflops": float(np.mean([r["total_tflops"] for r in per_seed]))}
    if ref_gain is not None:
      score = {x: suite_search.dev_score(summary[x]["dev_mean_forgetting"],
                                         summary[x]["dev_new_gain"], ref_gain) for x in alphas}
      out[n]["dev_scores"] = score
      out[n]["chosen_alpha"] = min(alphas, key=lambda x: (score[x], -x))
    for x in alphas:
      s = summary[x]
      chosen = " (dev)" if x == out[n].get("chosen_alpha") else ""
      lines.append(
          f"| {n} | {x:g}{chosen} | {s['mean_forgetting']:.3f} ± {s['mean_forgetting_std']:.3f} | "
          f"{s['new_gain']:.3f} ± {s['new_gain_std']:.3f} | "
          f"{s.get('dev_mean_forgetting', float('nan')):.3f} | "
          f"{s.get('dev_new_gain', float('nan')):.3f} | {out[n]['total_tflops']:.2f} |")
  print("\n".join(lines), flush=True)
  with open(a.json, "w", encoding="utf-8") as f:
    json.dump({"runs": a.runs, "reference_dev_gain": ref_gain, "rows": out,
               "markdown": "\n".join(lines)}, f, indent=2)


if __name__ == "__main__":
  main()
