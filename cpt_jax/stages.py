"""Sequences of training stages: pretrain M, then continued pre-training stages.

A config with stages looks like

  c.stage_order = "pretrain,cpt"
  c.stages.pretrain = {"data": {"new": "a,b,c"}, "train": {"steps": 300}}
  c.stages.cpt = {"init_from": "pretrain", "data": {"new": "t", "replay": "a,b"},
                  "optimizer": {"schedule": "rewarm_cosine"}}

Each stage is the base config with the stage's groups laid over it, run in
`<workdir>/stages/<name>`. `init_from` names an earlier stage whose final
checkpoint the stage warm-starts from ('' = the previous stage in the order,
'scratch' = random init). Every stage evaluates every domain that appears
anywhere in the run. A finished stage (its `summary.json` exists) is skipped
on re-run; an interrupted one resumes from its own checkpoint.

Before the first stage, the seed's random init of the run's model is evaluated
on every domain once (the forward-transfer baseline b_d, eval/transfer.py) and
cached in `<workdir>/baseline.json`. Shared files (summaries, baseline, report)
are written by process 0 only; every process returns the same results.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections

from cpt_jax import config as config_lib
from cpt_jax import features
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.eval import report as report_lib
from cpt_jax.schema import data as data_config
from cpt_jax.train import state as state_lib
from cpt_jax.train import trainer as trainer_lib

SUMMARY = "summary.json"
BASELINE = "baseline.json"



def make_trainer(config: ml_collections.ConfigDict, workdir: str,
                 **kwargs) -> trainer_lib.Trainer:
  """A Trainer for one stage with every feature its config can ask for (replay selection,
  rate controller, budget stop, ...: `features.make_hooks`)."""
  kwargs.setdefault("hooks_fn", features.make_hooks)
  return trainer_lib.Trainer(config, workdir, **kwargs)


def train(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict[str, Any]:
  """Trains one stage with its features (`make_trainer`); returns the run summary."""
  kwargs.setdefault("hooks_fn", features.make_hooks)
  return trainer_lib.train(config, workdir, **kwargs)

def trained_domains(cfg: ml_collections.ConfigDict, available: list[str] | None) -> dict:
  """{domain: role} of a stage's data config (patterns resolved)."""
  return data_config.resolve_roles(cfg.data, available)


def _available(cfg) -> list[str] | None:
  if cfg.data.source == "tfds":
    return None
  return sources_lib.list_domains(sources_lib.find_corpus_dir(cfg.data.corpus_dir),
                                  cfg.data.source)


def run_domains(config: ml_collections.ConfigDict) -> list[str]:
  """Every domain any stage trains on or evaluates, sorted."""
  out = set()
  for name in config_lib.stage_names(config):
    cfg = config_lib.stage_config(config, name)
    out |= set(trained_domains(cfg, _available(cfg)))
  return sorted(out)


def _with_all_domains_evaluated(cfg, all_domains: list[str]):
  roles = trained_domains(cfg, _available(cfg))
  extra = [d for d in all_domains if d not in roles]
  with cfg.unlocked():
    cfg.data.eval = ",".join(data_config.split_list(cfg.data.eval) + extra)
  return cfg


def _default_rewarm(config, name: str, init: str, cfg, parent_summary: dict | None = None):
  """A continued stage re-warms by default: from the LR its parent ended at, to its peak.

  Applies when the stage sets no `optimizer.schedule` (resp. `optimizer.init_lr`).
  A parent that its budget stopped early ended at its last logged LR, not its final one.
  """
  own = config.stages[name].get("optimizer", {})
  parent = config_lib.stage_config(config, init).optimizer
  summary = parent_summary or {}
  stopped = (summary.get("budget") or {}).get("stopped_at") is not None
  last_lr = (summary.get("last") or {}).get("learning_rate")
  with cfg.unlocked():
    if "schedule" not in own:
      cfg.optimizer.schedule = "rewarm_cosine"
    if "init_lr" not in own:
      cfg.optimizer.init_lr = (float(last_lr) if stopped and last_lr is not None
                               else float(parent.lr) * float(parent.final_lr_fraction))
  return cfg


def _write_json(path: str, obj: Any) -> None:
  """Writes a shared file atomically, from process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _baseline_key(cfg: ml_collections.ConfigDict) -> dict:
  """What the baseline depends on besides the domains: seed, model, vocabulary."""
  return {"seed": int(cfg.seed), "model": json.loads(cfg.model.to_json_best_effort()),
          "init_from_hf": str(cfg.train.init_from_hf),  # sets the model's shape
          "vocab": str(cfg.data.vocab), "seq_len": int(cfg.data.seq_len)}


def baseline_evals(config: ml_collections.ConfigDict, all_domains: list[str], workdir: str,
                   devices=None) -> dict[str, dict[str, float]]:
  """{domain: {'loss', 'bpb', 'tokens'}} of a randomly initialised model (b_d).

  The seed's init of the run's model (model-shaped: no sigma / tau split),
  evaluated like the first stage evaluates. Cached in `<workdir>/baseline.json`
  and reused while seed, model, vocabulary and domains match.
  """

  path = os.path.join(workdir, BASELINE)
  first = config_lib.stage_names(config)[0]
  key = _baseline_key(config_lib.stage_config(config, first))
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      cached = json.load(f)
    if cached.get("key") == key and all(d in cached["eval"] for d in all_domains):
      return {d: cached["eval"][d] for d in all_domains}
  cfg = _with_all_domains_evaluated(config_lib.stage_config(config, first), all_domains)
  with cfg.unlocked():
    cfg.decomposition = config_lib.default_config().decomposition
    if not cfg.data.cache_dir:  # share the first stage's packed rows
      cfg.data.cache_dir = pipeline_lib.default_cache_dir(
          cfg.data, os.path.abspath(os.path.join(workdir, "stages", first)))
  scratch = os.path.join(workdir, "baseline")
  trainer = trainer_lib.Trainer(cfg, scratch, devices=devices)
  try:
    ctx = trainer.ctx
    params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, cfg.seed,
                                  cfg.data.seq_len).params
    evals = trainer.evaluate(ctx.model_params(params), all_domains)
  finally:
    trainer.close()
  if jax.process_index() == 0:
    shutil.rmtree(scratch, ignore_errors=True)
  _write_json(path, {"key": key, "eval": evals})
  return evals


def run_stages(config: ml_collections.ConfigDict, workdir: str, **trainer_kwargs) -> dict:
  """Runs (or skips, when finished) every stage; writes and returns the report."""

  config_lib.validate_stages(config)
  names = config_lib.stage_names(config)
  all_domains = run_domains(config)
  os.makedirs(workdir, exist_ok=True)
  baseline = baseline_evals(config, all_domains, workdir, trainer_kwargs.get("devices"))
  summaries: dict[str, dict] = {}
  for name in names:
    stage_dir = os.path.join(workdir, "stages", name)
    summary_path = os.path.join(stage_dir, SUMMARY)
    if os.path.exists(summary_path):
      with open(summary_path, encoding="utf-8") as f:
        summaries[name] = json.load(f)
      trainer_lib.log(f"stage {name}: finished earlier, skipped")
      continue
    cfg = _with_all_domains_evaluated(config_lib.stage_config(config, name), all_domains)
    init = config_lib.init_stage_of(config, name)
    if init is not None and not cfg.train.init_checkpoint:
      with cfg.unlocked():
        cfg.train.init_checkpoint = os.path.join(workdir, "stages", init, "checkpoints")
    if init is not None:
      cfg = _default_rewarm(config, name, init, cfg, summaries.get(init))
    trainer_lib.log(f"stage {name}: " + (f"from stage {init}" if init else "from scratch"))
    summary = train(cfg, stage_dir, **trainer_kwargs)
    summary.update(name=name, init_from=init, learned=learned_domains(summary))
    _write_json(summary_path, summary)
    summaries[name] = summary
  report = report_lib.build_report(config, names, summaries, all_domains, workdir,
                                   baseline=baseline)
  if report["comparison"]:
    trainer_lib.log("comparison (validation loss in nats/token; forgetting = loss increase "
                    "on old domains; gain = loss decrease on T):\n"
                    + report_lib.comparison_table(report))
  trainer_lib.log(f"report: {os.path.join(workdir, 'report.md')}")
  return report


def learned_domains(summary: dict) -> list[str]:
  """Domains a stage trains on with cross-entropy or distillation."""
  return [d for d, r in zip(summary["domains"], summary["roles"]) if r in ("new", "replay",
                                                                          "distill")]
