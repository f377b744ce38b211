"""The suite's Pareto view: every row a point (mean forgetting, gain on T, total TFLOPs).

Random replay at its fractions (rows `random_<f>`, `--random-fractions`) is the
reference curve. A row *beats random at budget b* when, against the random
row at fraction b, it spends at most b's replay tokens and total TFLOPs
(selection and teacher forwards included) and it forgets at most as much
while its gain on T is at most MARGIN below. Its *random-equivalent fraction*
is the fraction at which random's curve (forgetting linear in log fraction
between neighbouring points) forgets as much as the row does: how far along
the replay axis a strategy moves the frontier.
"""

from __future__ import annotations

import math
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

MARGIN = 0.01  # gain on T a row may give up against random at b


def random_curve(table: list[dict]) -> list[dict]:
  """Random replay's aggregated rows (no '+' variants), by fraction."""
  pts = [r for r in table if r["name"].startswith("random_") and "+" not in r["name"]]
  return sorted(pts, key=lambda r: r["replay_fraction"])


def frontier(points: list[dict]) -> list[str]:
  """Names of the points no other point dominates (forgetting <=, gain >=, one strictly)."""
  out = []
  for p in points:
    dominated = any(q is not p and q["mean_forgetting"] <= p["mean_forgetting"]
                    and q["new_gain"] >= p["new_gain"]
                    and (q["mean_forgetting"] < p["mean_forgetting"]
                         or q["new_gain"] > p["new_gain"]) for q in points)
    if not dominated:
      out.append(p["name"])
  return out


def beats_random_at(row: dict, curve: list[dict], margin: float = MARGIN) -> list[float]:
  """The random fractions b the row beats (see the module docstring)."""
  return [b["replay_fraction"] for b in curve if b["name"] != row["name"]
          and row["replay_tokens"] <= b["replay_tokens"]
          and row["total_tflops"] <= b["total_tflops"]
          and row["mean_forgetting"] <= b["mean_forgetting"]
          and row["new_gain"] >= b["new_gain"] - margin]


def equivalent_fraction(forgetting: float, curve: list[dict]) -> float | None:
  """Random's fraction with this forgetting; None outside the curve's range (or < 2 points).

  Between neighbouring points (f0, F0), (f1, F1) with F between F0 and F1:
  log f = log f0 + (F - F0) / (F1 - F0) * (log f1 - log f0); the first such segment.
  """
  pts = [(r["replay_fraction"], r["mean_forgetting"]) for r in curve if r["replay_fraction"] > 0]
  for (f0, F0), (f1, F1) in zip(pts, pts[1:]):
    if min(F0, F1) <= forgetting <= max(F0, F1):
      if F1 == F0:
        return f0
      t = (forgetting - F0) / (F1 - F0)
      return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
  return None


def pareto(table: list[dict], margin: float = MARGIN) -> dict:
  """The report's `pareto` entry; also sets each table row's `beats_random_at`."""
  curve = random_curve(table)
  out = {"margin": margin,
         "random_curve": [{k: r[k] for k in ("name", "replay_fraction", "mean_forgetting",
                                                "new_gain", "total_tflops", "replay_tokens")}
                          for r in curve],
         "random_frontier": frontier(curve), "frontier": frontier(table), "rows": {}}
  for r in table:
    r["beats_random_at"] = beats_random_at(r, curve, margin)
    out["rows"][r["name"]] = {
        "point": [r["mean_forgetting"], r["new_gain"], r["total_tflops"]],
        "beats_random_at": r["beats_random_at"],
        "random_equivalent_fraction": equivalent_fraction(r["mean_forgetting"], curve)}
  return out


def plot(table: list[dict], path: str) -> str:
  """Forgetting (x) against gain on T (y): random's curve, every other row a labelled point."""
  curve = random_curve(table)
  fig, ax = plt.subplots(figsize=(8, 6))
  if curve:
    ax.errorbar([r["mean_forgetting"] for r in curve], [r["new_gain"] for r in curve],
                xerr=[r.get("mean_forgetting_std", 0.0) for r in curve],
                yerr=[r.get("new_gain_std", 0.0) for r in curve], fmt="o-", color="grey",
                label="random replay")
    for r in curve:
      ax.annotate(f"{100 * r['replay_fraction']:g}%", (r["mean_forgetting"], r["new_gain"]),
                  textcoords="offset points", xytext=(4, 4), fontsize=8, color="grey")
  others = [r for r in table if r not in curve]
  colors = plt.cm.tab10(np.linspace(0, 1, max(len(others), 1)))
  for r, col in zip(others, colors):
    ax.errorbar([r["mean_forgetting"]], [r["new_gain"]], xerr=[r.get("mean_forgetting_std", 0)],
                yerr=[r.get("new_gain_std", 0)], fmt="s", color=col, label=r["name"])
  ax.set_xlabel("mean forgetting on the old domains (test; lower is better)")
  ax.set_ylabel("gain on T (test; higher is better)")
  ax.set_title("replay selection: forgetting vs gain")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path
