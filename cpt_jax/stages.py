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
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import ml_collections

from cpt_jax import config as config_lib
from cpt_jax.data import config as data_config
from cpt_jax.data import sources as sources_lib

# Groups a stage may override (the model, mesh and runtime are per run).
STAGE_GROUPS = ("data", "train", "optimizer", "objective", "mixing", "replay",
                "decomposition")  # decomposition: each stage may add its own tau
STAGE_FIELDS = ("init_from", "description")
SUMMARY = "summary.json"


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
  """The stage order; errors name `stage_order` / `stages.<name>`."""
  names = [n for n in (s.strip() for s in config.stage_order.split(",")) if n]
  defined = list(config.stages.keys())
  if not names and defined:
    raise ValueError(f"config.stages defines {defined} but config.stage_order is empty")
  for n in names:
    if n not in config.stages:
      raise ValueError(f"stage_order names {n!r}, which config.stages does not define "
                       f"(defined: {defined})")
  extra = [n for n in defined if n not in names]
  if extra:
    raise ValueError(f"config.stages defines {extra}, which stage_order does not list")
  if len(set(names)) != len(names):
    raise ValueError(f"stage_order lists a stage twice: {config.stage_order!r}")
  return names


def validate_stages(config: ml_collections.ConfigDict) -> None:
  """Unknown keys inside a stage, or a bad `init_from`, raise ValueError."""
  names = stage_names(config)
  schema = config_lib.default_config()
  for i, name in enumerate(names):
    stage = config.stages[name]
    for key in stage.keys():
      if key in STAGE_FIELDS:
        continue
      if key not in STAGE_GROUPS or key not in schema:
        raise ValueError(f"stages.{name}.{key}: a stage may set {STAGE_FIELDS + STAGE_GROUPS}")
      for sub in stage[key].keys():
        if sub not in schema[key]:
          raise ValueError(f"unknown config key 'stages.{name}.{key}.{sub}'")
    init = stage.get("init_from", "")
    if init not in ("", "scratch") and init not in names[:i]:
      raise ValueError(f"stages.{name}.init_from={init!r} must name an earlier stage "
                       f"({names[:i]}), or be '' or 'scratch'")


def init_stage_of(config: ml_collections.ConfigDict, name: str) -> str | None:
  """The stage `name` warm-starts from, or None for random init / external init."""
  names = stage_names(config)
  init = config.stages[name].get("init_from", "")
  if init == "scratch":
    return None
  if init:
    return init
  i = names.index(name)
  return names[i - 1] if i > 0 else None


def stage_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The base config with stage `name`'s groups laid over it (and no stages)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    stage = config.stages[name]
    for group in STAGE_GROUPS:
      if group in stage:
        for key, value in stage[group].items():
          out[group][key] = value
    out.stages = ml_collections.ConfigDict()
    out.stage_order = ""
    out.run_name = name
  return out


def trained_domains(cfg: ml_collections.ConfigDict, available: list[str] | None) -> dict:
  """{domain: role} of a stage's data config (patterns resolved)."""
  return data_config.resolve_roles(cfg.data, available)


def _available(cfg) -> list[str] | None:
  if cfg.data.source == "tfds":
    return None
  return sources_lib.list_domains(data_config.find_corpus_dir(cfg.data.corpus_dir),
                                  cfg.data.source)


def run_domains(config: ml_collections.ConfigDict) -> list[str]:
  """Every domain any stage trains on or evaluates, sorted."""
  out = set()
  for name in stage_names(config):
    cfg = stage_config(config, name)
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
  parent = stage_config(config, init).optimizer
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
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def run_stages(config: ml_collections.ConfigDict, workdir: str, **trainer_kwargs) -> dict:
  """Runs (or skips, when finished) every stage; writes and returns the report."""
  from cpt_jax.eval import report as report_lib  # pylint: disable=g-import-not-at-top
  from cpt_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  validate_stages(config)
  names = stage_names(config)
  all_domains = run_domains(config)
  summaries: dict[str, dict] = {}
  for name in names:
    stage_dir = os.path.join(workdir, "stages", name)
    summary_path = os.path.join(stage_dir, SUMMARY)
    if os.path.exists(summary_path):
      with open(summary_path, encoding="utf-8") as f:
        summaries[name] = json.load(f)
      trainer_lib.log(f"stage {name}: finished earlier, skipped")
      continue
    cfg = _with_all_domains_evaluated(stage_config(config, name), all_domains)
    init = init_stage_of(config, name)
    if init is not None and not cfg.train.init_checkpoint:
      with cfg.unlocked():
        cfg.train.init_checkpoint = os.path.join(workdir, "stages", init, "checkpoints")
    if init is not None:
      cfg = _default_rewarm(config, name, init, cfg, summaries.get(init))
    trainer_lib.log(f"stage {name}: " + (f"from stage {init}" if init else "from scratch"))
    summary = trainer_lib.train(cfg, stage_dir, **trainer_kwargs)
    summary.update(name=name, init_from=init, learned=learned_domains(summary))
    _write_json(summary_path, summary)
    summaries[name] = summary
  report = report_lib.build_report(config, names, summaries, all_domains, workdir)
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
