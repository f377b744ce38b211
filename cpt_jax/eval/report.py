"""The run report: loss/bpb matrices, transfer metrics, compute, tables and plots.

Writes `<workdir>/report.json` and `<workdir>/report.md` (+ PNG plots), from
process 0 only.
A *track* is a chain of stages linked by `init_from` (pretrain -> cpt_1 -> ...);
transfer metrics are computed per track (eval/transfer.py).
The stage that trains a domain is the first of the track whose roles give it
'new'. Forward transfer compares the loss before that stage with b_d, the loss
of a randomly initialised model of the run's shape, evaluated once per run.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
import numpy as np

from cpt_jax import paths
from cpt_jax.eval.transfer import transfer_metrics
from cpt_jax.train import metrics as metrics_lib


def _track(name: str, summaries: dict[str, dict]) -> list[str]:
  chain = [name]
  while summaries[chain[0]].get("init_from"):
    chain.insert(0, summaries[chain[0]]["init_from"])
  return chain


def comparison_rows(names, summaries, loss: np.ndarray, domains) -> list[dict]:
  """Per stage with a parent: old-domain losses, forgetting and gain on T versus the parent."""
  col = {d: j for j, d in enumerate(domains)}
  row = {n: i for i, n in enumerate(names)}
  out = []
  for n in names:
    parent = summaries[n].get("init_from")
    if not parent:
      continue
    roles = dict(zip(summaries[n]["domains"], summaries[n]["roles"]))
    new = [d for d, r in roles.items() if r == "new"]
    old = [d for d in summaries[parent]["learned"] if d not in new]
    old_loss = {d: float(loss[row[n], col[d]]) for d in old}
    forgetting = {d: float(loss[row[n], col[d]] - loss[row[parent], col[d]]) for d in old}
    gain = {d: float(loss[row[parent], col[d]] - loss[row[n], col[d]]) for d in new}
    out.append({"stage": n, "from": parent, "new": new,
                "replay": [d for d, r in roles.items() if r == "replay"],
                "distill": [d for d, r in roles.items() if r == "distill"],
                "old_loss": old_loss, "forgetting": forgetting,
                "mean_forgetting": float(np.mean(list(forgetting.values()))) if old else 0.0,
                "new_gain": float(np.mean(list(gain.values()))) if new else 0.0})
  return out


FWT_NOTE = ("fwt (Lopez-Paz & Ranzato 2017, GEM, in loss form): mean over the domains d that "
            "a stage after the track's first trains as new (first time in the track) of "
            "b_d - L[stage before][d], where b_d is the loss on d of a randomly initialised "
            "model of the run's shape (the seed's init), evaluated once per run "
            "(baseline.json); positive = the earlier stages helped d before it was trained. "
            "The track's first stage (e.g. the pretrain) gives no term.")


def _new(summary: dict) -> list[str]:
  return [d for d, r in zip(summary["domains"], summary["roles"]) if r == "new"]


def build_report(config, names: list[str], summaries: dict[str, dict], domains: list[str],
                 workdir: str, baseline: dict[str, dict] | None = None) -> dict[str, Any]:
  """Assembles, writes (process 0) and returns the report of a staged run.

  baseline: {domain: {'loss', 'bpb'}} of a random-init model (b_d); without it fwt is None.
  """
  loss = np.array([[summaries[n]["eval"][d]["loss"] for d in domains] for n in names])
  bpb = np.array([[summaries[n]["eval"][d]["bpb"] for d in domains] for n in names])
  row = {n: i for i, n in enumerate(names)}
  leaves = [n for n in names if not any(summaries[m].get("init_from") == n for m in names)]
  tracks = {}
  for leaf in leaves:
    chain = _track(leaf, summaries)
    m = transfer_metrics(loss[[row[c] for c in chain]], domains,
                         [summaries[c]["learned"] for c in chain],
                         new=[_new(summaries[c]) for c in chain],
                         baseline=None if baseline is None else
                         {d: v["loss"] for d, v in baseline.items()})
    tracks[leaf] = {"stages": chain, **m}
  main = tracks[leaves[-1]]
  stages = []
  for n in names:
    s = summaries[n]
    sel = s.get("selection", {})
    stages.append({
        "name": n, "init_from": s.get("init_from"), "learned": s["learned"],
        "roles": dict(zip(s["domains"], s["roles"])), "steps": s["step"],
        "seconds": s.get("seconds"),
        "tokens": {"train": s["train_tokens"],
                   "teacher": s["teacher_rows"] * config.data.seq_len,
                   "selection": sel.get("tokens", 0)},
        "tflops": {"train": s["train_tflops"], "teacher": s["teacher_tflops"],
                   "selection": sel.get("tflops", 0.0)},
        # settings changed on a resume (train.on_config_change / allow-list; workdir.py)
        "config_changes": s.get("config_changes") or [],
    })
  report = {
      "stages": stages, "domains": domains,
      "loss_matrix": loss.tolist(), "bpb_matrix": bpb.tolist(),
      "baseline": None if baseline is None else {
          d: {"loss": baseline[d]["loss"], "bpb": baseline[d]["bpb"]} for d in domains},
      "bwt": main["bwt"], "fwt": main["fwt"], "forgetting": main["forgetting"],
      "mean_forgetting": main["mean_forgetting"], "average_loss": main["average_loss"],
      "tracks": tracks, "comparison": comparison_rows(names, summaries, loss, domains),
  }
  # sigma / tau decomposition: every domain with and without the stage's tau.
  report["without_tau"] = {
      n: {d: {"with_tau": summaries[n]["eval"][d]["loss"], "without_tau": v["loss"]}
          for d, v in summaries[n]["eval_without_tau"].items()}
      for n in names if summaries[n].get("eval_without_tau")}
  if jax.process_index() == 0:  # shared files: one writer; every process returns the report
    paths.write_atomic(os.path.join(workdir, "report.json"), json.dumps(report, indent=2))
    plots = write_plots(names, domains, workdir)
    paths.write_atomic(os.path.join(workdir, "report.md"), markdown(report, plots))
  return report


def _decimals(column: list[Any], least: int = 3, most: int = 6) -> int:
  """Decimals that print different floats of a column differently (at least `least`)."""
  floats = sorted({v for v in column if isinstance(v, float)})
  for d in range(least, most):
    if len({f"{v:.{d}f}" for v in floats}) == len(floats):
      return d
  return most


def _table(header: list[str], rows: list[list[Any]]) -> str:
  decimals = [_decimals([r[i] for r in rows]) for i in range(len(header))]
  fmt = lambda v, d: f"{v:.{d}f}" if isinstance(v, float) else "-" if v is None else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v, d) for v, d in zip(r, decimals)) + " |" for r in rows]
  return "\n".join(lines)


def comparison_table(report: dict) -> str:
  """Old-domain losses, mean forgetting and gain on T per CPT stage (markdown)."""
  rows = report["comparison"]
  if not rows:
    return "(no stage continues from another)"
  old = sorted({d for r in rows for d in r["old_loss"]})
  header = ["stage", "from", "replay", "distill"] + [f"loss {d}" for d in old] + [
      "mean forgetting", "gain on T"]
  body = [[r["stage"], r["from"], ",".join(r["replay"]) or "-", ",".join(r["distill"]) or "-"]
          + [r["old_loss"].get(d, float("nan")) for d in old]
          + [r["mean_forgetting"], r["new_gain"]] for r in rows]
  return _table(header, body)


def markdown(report: dict, plots: list[str]) -> str:
  d = report["domains"]
  names = [s["name"] for s in report["stages"]]
  base = report.get("baseline")
  base_row = lambda key: [["random init (b_d)"] + [base[x][key] for x in d]] if base else []
  parts = ["# Continued pre-training report", "",
           "Losses are validation cross-entropy in nats per token; bpb is bits per byte.", "",
           "## Comparison (each stage versus the stage it starts from)", "",
           comparison_table(report), "",
           "## Loss matrix (rows: after stage; columns: domain)", "",
           _table(["stage"] + d, base_row("loss")
                  + [[n] + r for n, r in zip(names, report["loss_matrix"])]), "",
           "## Bits per byte", "",
           _table(["stage"] + d, base_row("bpb")
                  + [[n] + r for n, r in zip(names, report["bpb_matrix"])]), "",
           "## Transfer per track", "",
           "bwt < 0 and forgetting > 0 mean forgetting. " + FWT_NOTE, ""]
  parts.append(_table(["track", "bwt", "fwt", "mean forgetting", "average loss"],
                      [[" -> ".join(t["stages"]), t["bwt"], t["fwt"], t["mean_forgetting"],
                        t["average_loss"]] for t in report["tracks"].values()]))
  parts += ["", "## Compute per stage", ""]
  parts.append(_table(
      ["stage", "steps", "train TFLOPs", "teacher TFLOPs", "selection TFLOPs", "train tokens",
       "teacher tokens", "seconds"],
      [[s["name"], s["steps"], s["tflops"]["train"], s["tflops"]["teacher"],
        s["tflops"]["selection"], s["tokens"]["train"], s["tokens"]["teacher"],
        s["seconds"] if s["seconds"] is not None else "-"] for s in report["stages"]]))
  if report.get("without_tau"):  # sigma / tau decomposition
    parts += ["", "## With and without each stage's tau (validation loss)", ""]
    parts.append(_table(
        ["stage", "domain", "with tau", "without tau (sigma)"],
        [[n, d, v["with_tau"], v["without_tau"]] for n, per in report["without_tau"].items()
         for d, v in per.items()]))
  changes = [[s["name"], c["step"], key, json.dumps(v["old"]), json.dumps(v["new"]), v["by"]]
             for s in report["stages"] for c in s.get("config_changes", [])
             for key, v in c["changes"].items()]
  if changes:  # a stage resumed with other settings than it started with
    parts += ["", "## Settings changed during a stage (config_history.jsonl)", ""]
    parts.append(_table(["stage", "from step", "key", "old", "new", "accepted by"], changes))
  parts += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
  return "\n".join(parts)


def _save(fig, path: str) -> None:
  """Writes a figure as PNG to a local or bucket path."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  paths.write_atomic(path, buf.getvalue())


def write_plots(names: list[str], domains: list[str], workdir: str) -> list[str]:
  """domain_loss.png and mixture_weights.png, one panel per stage; returns file names."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  out = []
  n = len(names)
  fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False, sharey=True)
  for ax, name in zip(axes[0], names):
    stage_dir = os.path.join(workdir, "stages", name)
    evals = metrics_lib.read_metrics(stage_dir, "eval")
    train = metrics_lib.read_metrics(stage_dir)
    for i, dom in enumerate(domains):
      color = f"C{i % 10}"
      pts = [(r["step"], r[dom]["loss"]) for r in evals if dom in r]
      if pts:
        ax.plot(*zip(*pts), "o-", color=color, label=dom)
      tr = [(r["step"], r["domain_loss"][dom]) for r in train if dom in r.get("domain_loss", {})]
      if tr:
        ax.plot(*zip(*tr), "--", color=color, alpha=0.5)
    ax.set_title(name)
    ax.set_xlabel("step")
  axes[0][0].set_ylabel("loss (solid: validation, dashed: train)")
  axes[0][-1].legend(fontsize=7, loc="upper right")
  fig.tight_layout()
  _save(fig, os.path.join(workdir, "domain_loss.png"))
  plt.close(fig)
  out.append("domain_loss.png")

  fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.2), squeeze=False, sharey=True)
  for ax, name in zip(axes[0], names):
    train = metrics_lib.read_metrics(os.path.join(workdir, "stages", name))
    steps = [r["step"] for r in train if "weights" in r]
    if steps:
      keys = [d for d in domains if any(r["weights"].get(d, 0) > 0 for r in train)]
      ys = np.array([[r["weights"].get(d, 0.0) for r in train] for d in keys])
      ax.stackplot(steps, ys, labels=keys,
                   colors=[f"C{domains.index(d) % 10}" for d in keys])
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
  axes[0][0].set_ylabel("mixture weight")
  axes[0][-1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  _save(fig, os.path.join(workdir, "mixture_weights.png"))
  plt.close(fig)
  out.append("mixture_weights.png")
  return out
