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
on re-run while its settings are the ones its folder recorded (train/workdir.py);
an interrupted one resumes from its own checkpoint. Before the baseline or any
stage runs, every finished stage's settings are compared with its recorded ones:
a change outside the allow-list stops the run, naming the stage and each
`key: old -> new`, unless `train.on_config_change='continue'`. A finished stage
is re-entered (resumed from its final checkpoint, the change recorded in its
history, summary and report.md) when its settings changed with 'continue', or
when an allowed change lets it train on (`workdir.RESUMING_CHANGES`: more
`train.steps`, other budget caps). A finished stage whose parent trained further
in this invocation is an error: it was trained from the parent's old final model
(move its folder aside to retrain it). The run holds the workdir's lock
(`run.lock`), each stage its own folder's.

Before the baseline or any stage trains, every stage's config is checked as its trainer
will get it (`validate_config`, the error naming the stage) and so are its data splits.
Then the seed's random init of the run's model is evaluated
on every domain once (the forward-transfer baseline b_d, eval/transfer.py) and
cached in `<workdir>/baseline.json`. Shared files (summaries, baseline, report)
are written by process 0 only; every process returns the same results.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import ml_collections

from cpt_jax import config as config_lib
from cpt_jax import features
from cpt_jax import paths
from cpt_jax.data import domain_stores
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.eval import report as report_lib
from cpt_jax.model import hf
from cpt_jax.parallel import distributed
from cpt_jax.schema import data as data_config
from cpt_jax.schema import train as train_schema
from cpt_jax.train import state as state_lib
from cpt_jax.train import trainer as trainer_lib
from cpt_jax.train import workdir as workdir_lib

SUMMARY = "summary.json"
BASELINE = "baseline.json"


def make_trainer(config: ml_collections.ConfigDict, workdir: str,
                 **kwargs) -> trainer_lib.Trainer:
  """A Trainer for one stage with every feature its config can ask for (replay selection,
  rate controller, budget stop, ...: `features.make_hooks`)."""
  kwargs.setdefault("hooks_fn", features.make_hooks)
  return trainer_lib.Trainer(train_schema.resolve_progress_bar(config), workdir, **kwargs)


def train(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict[str, Any]:
  """Trains one stage with its features (`make_trainer`); returns the run summary."""
  kwargs.setdefault("hooks_fn", features.make_hooks)
  return trainer_lib.train(train_schema.resolve_progress_bar(config), workdir, **kwargs)


def trained_domains(cfg: ml_collections.ConfigDict) -> dict:
  """{domain: role} of a stage's data config (patterns, seqio Tasks and Mixtures resolved)."""
  return domain_stores.resolve_domains(cfg.data)[1]


def run_domains(config: ml_collections.ConfigDict) -> list[str]:
  """Every domain any stage trains on or evaluates, sorted."""
  out = set()
  for name in config_lib.stage_names(config):
    cfg = config_lib.stage_config(config, name)
    out |= set(trained_domains(cfg))
  return sorted(out)


def _with_all_domains_evaluated(cfg, all_domains: list[str]):
  roles = trained_domains(cfg)
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
  ended = float(parent.lr) * (1.0 if _schedule_of(config, init) == "constant"
                              else float(parent.final_lr_fraction))
  summary = parent_summary or {}
  stopped = (summary.get("budget") or {}).get("stopped_at") is not None
  last_lr = (summary.get("last") or {}).get("learning_rate")
  with cfg.unlocked():
    if "schedule" not in own:
      cfg.optimizer.schedule = "rewarm_cosine"
    if "init_lr" not in own:
      cfg.optimizer.init_lr = float(last_lr) if stopped and last_lr is not None else ended
  return cfg


def _schedule_of(config, name: str) -> str:
  """The LR schedule stage `name` trains with: its own, else a re-warm when it continues
  another stage (`_default_rewarm`), else the base config's."""
  own = config.stages[name].get("optimizer", {})
  if "schedule" in own:
    return own["schedule"]
  if config_lib.init_stage_of(config, name) is not None:
    return "rewarm_cosine"
  return config_lib.stage_config(config, name).optimizer.schedule


def _write_json(path: str, obj: Any) -> None:
  """Writes a shared file atomically, from process 0 only."""
  if jax.process_index() != 0:
    return
  paths.write_atomic(path, json.dumps(obj, indent=2))


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
  if paths.as_path(path).exists():
    cached = json.loads(paths.as_path(path).read_text())
    if cached.get("key") == key and all(d in cached["eval"] for d in all_domains):
      return {d: cached["eval"][d] for d in all_domains}
  cfg = _with_all_domains_evaluated(config_lib.stage_config(config, first), all_domains)
  with cfg.unlocked():
    cfg.decomposition = config_lib.default_config().decomposition
    if not cfg.data.cache_dir:  # share the first stage's packed rows
      cfg.data.cache_dir = pipeline_lib.default_cache_dir(
          cfg.data, os.path.join(workdir, "stages", first))
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
    if paths.as_path(scratch).exists():
      paths.as_path(scratch).rmtree()
  _write_json(path, {"key": key, "eval": evals})
  return evals


def run_stages(config: ml_collections.ConfigDict, workdir: str, **trainer_kwargs) -> dict:
  """Runs (or skips, when finished and unchanged) every stage, holding the workdir's lock
  (process 0); writes and returns the report."""
  distributed.maybe_initialize(config.distributed)  # before the first JAX call below
  config_lib.validate_stages(config)
  workdir = paths.absolute(workdir)  # a gs:// workdir stays a URI
  paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  lock = (workdir_lib.WorkdirLock(workdir, config.train.lock_stale_minutes)
          if jax.process_index() == 0 else contextlib.nullcontext())
  with lock:
    return _run_stages(config, workdir, **trainer_kwargs)


def _stage_config(config, name: str, all_domains: list[str], workdir: str,
                  summaries: dict[str, dict]) -> ml_collections.ConfigDict:
  """Stage `name`'s config as its trainer gets it: every domain evaluated, warm start from
  its parent's checkpoints, the parent's LR re-warmed (`summaries`: the finished ones)."""
  cfg = _with_all_domains_evaluated(config_lib.stage_config(config, name), all_domains)
  init = config_lib.init_stage_of(config, name)
  if init is not None and not cfg.train.init_checkpoint:
    with cfg.unlocked():
      cfg.train.init_checkpoint = os.path.join(workdir, "stages", init, "checkpoints")
  if init is not None:
    cfg = _default_rewarm(config, name, init, cfg, summaries.get(init))
  return cfg


def _validate_stage(cfg, name: str, num_devices: int) -> None:
  """`validate_config` on stage `name`'s config as its trainer will get it; the error names
  the stage."""
  try:
    config_lib.validate_config(hf.apply_hf_config(cfg), num_devices, jax.process_count())
  except ValueError as e:
    raise ValueError(f"stages.{name} (the base config with the stage laid over it): "
                     f"{e}") from None


def _stage_identity(cfg, stage_dir: str) -> workdir_lib.RunIdentity:
  """The stage folder's recorded settings against `cfg` (as the trainer will see it)."""
  return workdir_lib.RunIdentity(stage_dir, hf.apply_hf_config(cfg))


def _finished(workdir: str, names: list[str]) -> dict[str, dict]:
  """{stage: its summary} of the stages finished earlier."""
  out = {}
  for name in names:
    path = paths.as_path(workdir, "stages", name, SUMMARY)
    if path.exists():
      out[name] = json.loads(path.read_text())
  return out


def _rerun_reason(config, name: str, identity: workdir_lib.RunIdentity,
                  trained: set[str]) -> str:
  """Why a finished stage is re-entered ('' = skip it as current); raises if its parent
  trains further in this invocation (`trained`): the stage is then stale."""
  init = config_lib.init_stage_of(config, name)
  if init in trained:
    raise workdir_lib.ConfigChangedError(
        f"stage {name} finished earlier from stage {init}'s final model, but {init} trains "
        f"further in this run, so {name} would not be current. Move {identity.workdir} aside "
        f"to retrain it from {init}, or keep {init}'s settings")
  if identity.blocking:  # on_config_change='continue' (else the first pass stopped)
    return "its settings changed (train.on_config_change=continue): resuming it"
  resuming = [k for k in identity.changes if k in workdir_lib.RESUMING_CHANGES]
  return f"{', '.join(resuming)} changed: resuming it" if resuming else ""


def _check_finished(config, workdir: str, all_domains: list[str],
                    finished: dict[str, dict]) -> None:
  """Before the baseline or any stage runs: each finished stage's settings against its
  recorded ones (ConfigChangedError under on_config_change='stop'), and no finished stage
  whose parent will train further."""
  ahead: set[str] = set()  # finished stages that will train further
  for name, summary in finished.items():
    cfg = _stage_config(config, name, all_domains, workdir, finished)
    identity = _stage_identity(cfg, os.path.join(workdir, "stages", name)).check(
        summary["step"], where=f"stage {name}: ")
    stopped = (summary.get("budget") or {}).get("stopped_at") is not None
    caps = any(k in identity.changes for k in ("replay.max_tflops", "replay.max_seconds"))
    if (_rerun_reason(config, name, identity, ahead) and cfg.train.steps > summary["step"]
        and (caps or not stopped)):
      ahead.add(name)


def _run_stages(config: ml_collections.ConfigDict, workdir: str, **trainer_kwargs) -> dict:
  names = config_lib.stage_names(config)
  all_domains = run_domains(config)
  finished = _finished(workdir, names)
  _check_finished(config, workdir, all_domains, finished)
  devices = trainer_kwargs.get("devices") or jax.devices()
  for name in names:  # every stage's settings and data, before the baseline or any stage runs
    cfg = _stage_config(config, name, all_domains, workdir, {})
    _validate_stage(cfg, name, len(devices))
    domain_stores.check_splits(cfg.data)
  baseline = baseline_evals(config, all_domains, workdir, trainer_kwargs.get("devices"))
  summaries: dict[str, dict] = {}
  trained: set[str] = set()  # stages that trained steps in this invocation
  for name in names:
    stage_dir = os.path.join(workdir, "stages", name)
    cfg = _stage_config(config, name, all_domains, workdir, summaries)
    init = config_lib.init_stage_of(config, name)
    if name in finished:
      why = _rerun_reason(config, name, _stage_identity(cfg, stage_dir), trained)
      if not why:
        summaries[name] = finished[name]
        trainer_lib.log(f"stage {name}: finished earlier, skipped")
        continue
      trainer_lib.log(f"stage {name}: finished earlier; {why}")
    else:
      trainer_lib.log(f"stage {name}: " + (f"from stage {init}" if init else "from scratch"))
    summary = train(cfg, stage_dir, **trainer_kwargs)
    summary.update(name=name, init_from=init, learned=learned_domains(summary))
    _write_json(os.path.join(stage_dir, SUMMARY), summary)
    summaries[name] = summary
    if summary["steps_run"] > 0:
      trained.add(name)
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
