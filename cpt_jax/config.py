"""The config schema: every key a run may set, its default, validation, and stages.

Config files in `configs/` start from `default_config()` and override fields;
`validate_config` rejects keys the schema does not know and settings that cannot
run (mesh, batch) before anything compiles. The groups `data`, `mixing`,
`replay` and `decomposition` live in `cpt_jax/schema/`; this module assembles
them. It is the bottom of the package's layers: it imports only the schema
groups, `batch` and `parallel/sharding` (see ARCHITECTURE.md).

Stages (`stage_order`, `stages.<name>`): each stage is the base config with the
stage's groups laid over it (`stage_config`); `stages.py` runs them. A stage
that sets one key of a family (`REPLACED_TOGETHER`: the replay amount
`replay.fraction` / `replay.tokens`) replaces the base's whole family.

Deprecated keys (`replay.budget`, `mixing.replay_budget`; see
`cpt_jax/schema/deprecated.py`) are moved to their new keys in place by
`upgrade_deprecated`, which `validate_config` and `stage_config` call.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import re
import sys
from typing import Any

import ml_collections
from ml_collections import config_dict

from cpt_jax.parallel import sharding as shd
from cpt_jax.schema import data as data_schema
from cpt_jax.schema import decomposition as decomposition_schema
from cpt_jax.schema import mixing as mixing_schema
from cpt_jax.schema import replay as replay_schema

ATTENTION_KINDS = ("native", "dot_product", "cudnn")  # model.attention
ON_DIVERGENCE = ("stop", "rollback")  # train.on_divergence
LR_SCHEDULES = ("constant", "cosine", "rewarm_cosine", "wsd")  # optimizer.schedule
ON_CONFIG_CHANGE = ("stop", "continue")  # train.on_config_change
# Integer keys that must be >= 1 / >= 0 (checked first, so later checks may divide by them).
POSITIVE_INTS = {"model": ("vocab_size", "vocab_pad_multiple", "d_model", "num_layers",
                           "num_heads", "num_kv_heads", "mlp_dim"),
                 "train": ("global_batch_size", "log_every", "checkpoint_every",
                           "keep_checkpoints")}
NON_NEGATIVE_INTS = {"model": ("head_dim",), "train": ("eval_every", "eval_batches")}
# Groups a stage may override (the model, mesh and runtime are per run).
STAGE_GROUPS = ("data", "train", "optimizer", "objective", "mixing", "replay",
                "decomposition")  # decomposition: each stage may add its own tau
STAGE_FIELDS = ("init_from", "description")
# Keys a stage replaces as one: setting any of them resets the others to their defaults
# (deprecated keys included), so the stage's value is the only one in force.
REPLACED_TOGETHER = {"replay": ("fraction", "tokens", "budget"),
                     "mixing": ("max_old_share", "replay_budget")}


def default_config() -> ml_collections.ConfigDict:
  """All keys with defaults; a tiny byte-level model that trains on CPU."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init and data order.
  c.run_name = ""  # Free-form label written into metrics and reports.

  c.model = config_dict.create(
      vocab_size=259,  # Must cover the vocabulary (ByteVocabulary: 259).
      vocab_pad_multiple=128,  # Embedding/output tables padded to a multiple (sharding).
      d_model=128,  # Residual width.
      num_layers=2,  # Decoder blocks.
      num_heads=4,  # Query heads.
      num_kv_heads=4,  # Key/value heads (grouped-query attention if < num_heads).
      head_dim=0,  # 0: d_model // num_heads.
      mlp_dim=512,  # SwiGLU hidden width.
      norm_eps=1e-5,  # RMSNorm epsilon.
      rope_theta=10000.0,  # Rotary base.
      rope_scaling="",  # '', 'linear' or 'llama3'.
      rope_scaling_factor=1.0,  # Rotary scaling factor.
      rope_low_freq_factor=1.0,  # llama3 scaling: low-frequency factor.
      rope_high_freq_factor=4.0,  # llama3 scaling: high-frequency factor.
      rope_original_max_len=8192,  # llama3 scaling: original context length.
      tie_embeddings=False,  # Share input embedding and output projection.
      qkv_bias=False,  # Biases on q/k/v projections (Qwen2).
      init_std=0.02,  # Stddev of kernel initialisers.
      dtype="float32",  # Compute dtype: 'float32' or 'bfloat16' (params stay f32).
      remat="none",  # 'none', 'full', 'dots' or 'dots_no_batch'.
      scan_layers=False,  # nn.scan over layers (faster compiles for deep models).
      attention="native",  # 'native' (einsum; best on CPU), 'dot_product' or 'cudnn' (GPU).
  )

  c.train = config_dict.create(
      steps=200,  # Optimizer steps in this run (stage).
      global_batch_size=16,  # Rows per step over all processes.
      grad_accum_steps=1,  # Microbatches per step.
      z_loss=0.0,  # Coefficient of the log(Z)^2 penalty.
      log_every=10,  # Steps between metric writes.
      eval_every=0,  # Steps between per-domain validation evals (0: end only).
      eval_batches=4,  # Validation batches per domain per eval (0: all).
      checkpoint_every=100,  # Steps between checkpoints (the final step is always saved).
      keep_checkpoints=2,  # Checkpoints kept in the workdir.
      async_checkpoints=True,  # Write checkpoints in the background.
      init_checkpoint="",  # Warm-start params from this checkpoint dir (another run).
      init_from_hf="",  # Warm-start from a Hugging Face folder (config.json + safetensors);
      # sets config.model from it and data.vocab to its tokenizer when data.vocab='byte'.
      progress_bar=True,  # tqdm progress bar with rate and ETA when stderr is a terminal;
      # otherwise (pods, redirected logs) and when False, one line per log window.
      peak_flops=0.0,  # One device's peak FLOP/s; MFU divides by it x devices (0: measure).
      on_divergence="stop",  # A NaN/Inf loss or params, or a loss spike: 'stop' (naming the
      # newest good checkpoint) or 'rollback' (reload it, skip the batches since; divergence.py).
      loss_spike_factor=0.0,  # >1: a log window's mean loss above this x the previous
      # window's counts as divergence (0: off).
      max_rollbacks=3,  # 'rollback': rollbacks in a stage before it stops (kept in checkpoints).
      on_config_change="stop",  # A resume / staged rerun whose settings differ from the
      # workdir's recorded ones (config.json + config_history.jsonl) outside the allow-list
      # (train/workdir.py ALLOWED_CHANGES: train.steps extension, eval / checkpoint cadence,
      # progress bar, budget caps, mesh, ...): 'stop' before the first step, printing
      # `key: old -> new`, or 'continue' (the change and its step go into the history, the
      # summary's config_changes and report.md).
      profile_steps="",  # 'a:b': a jax.profiler trace of steps a+1..b in <workdir>/profile
      # (TensorBoard's profile plugin: tensorboard --logdir <workdir>/profile); '' = off.
      lock_stale_minutes=30.0,  # The workdir lock (run.lock) of a run on another host whose
      # heartbeat (touched every minute) is older than this is stale and taken over (0: never);
      # on this host a lock whose pid is not running always is.
  )

  c.optimizer = config_dict.create(
      lr=3e-3,  # Peak learning rate.
      schedule="cosine",  # 'constant', 'cosine', 'rewarm_cosine' or 'wsd'.
      warmup_steps=20,  # Linear warmup steps.
      init_lr=0.0,  # rewarm_cosine: LR the warmup starts from.
      final_lr_fraction=0.1,  # Floor of the decay, as a fraction of lr.
      decay_fraction=0.2,  # wsd: fraction of steps in the final decay.
      b1=0.9,  # Adam beta1.
      b2=0.95,  # Adam beta2.
      eps=1e-8,  # Adam epsilon.
      weight_decay=0.1,  # Decoupled weight decay.
      decay_embeddings=False,  # Apply weight decay to the embedding table.
      no_decay_pattern=r"(norm|bias|scale)",  # Regex of param paths never decayed.
      clip_norm=1.0,  # Global-norm gradient clipping (0: off).
  )

  c.objective = config_dict.create(
      lambda_replay=1.0,  # Weight of CE on replay rows (1.0 = plain mixing).
      lambda_kd=0.0,  # Weight of KL(teacher || student) on distill rows.
      replay_kd=0.0,  # Weight of KL(teacher || student) on replay rows, added to their CE.
      kd_temperature=1.0,  # Distillation temperature tau (term scaled by tau^2).
      kd_topk=0,  # >0: KL over the teacher's top-k tokens plus a tail bucket.
      l2sp=0.0,  # L2-SP pull toward the stage's starting params.
      ewc=0.0,  # EWC strength (diagonal Fisher).
      ewc_batches=4,  # Batches used to estimate the Fisher.
      ewc_fisher="true",  # 'true': labels sampled from the model; 'empirical': the data's.
  )

  c.sharding = config_dict.create(
      mesh_shape=(-1, 1, 1),  # (data, fsdp, tensor); -1 = the remaining devices.
      logical_axis_rules=shd.DEFAULT_RULES,  # (logical axis, mesh axes) pairs.
  )

  c.distributed = config_dict.create(
      initialize="auto",  # 'auto' (from env), 'yes' or 'no': call jax.distributed.initialize().
      coordinator_address="",  # host:port of process 0 ('' = from the environment).
      num_processes=0,  # 0 = from the environment.
      process_id=-1,  # -1 = from the environment.
  )

  c.data = data_schema.default_data_config()
  c.mixing = mixing_schema.default_mixing_config()
  c.replay = replay_schema.default_replay_config()

  c.decomposition = decomposition_schema.default_decomposition_config()  # sigma / tau

  # Stages (continued pre-training): see cpt_jax/stages.py. Empty = one run.
  c.stage_order = ""  # Comma-separated stage names, in run order.
  c.stages = ml_collections.ConfigDict()  # name -> {init_from, data, train, optimizer, ...}
  return c


def _unknown_keys(cfg: Any, schema: Any, prefix: str = "") -> list[tuple[str, list[str]]]:
  out = []
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in schema:
      out.append((path, list(schema.keys())))
      continue
    if path == "stages":  # stage contents are checked by validate_stages
      continue
    sub, ref = cfg[key], schema[key]
    if isinstance(ref, ml_collections.ConfigDict) and isinstance(sub, ml_collections.ConfigDict):
      out += _unknown_keys(sub, ref, path + ".")
  return out


def upgrade_deprecated(cfg: ml_collections.ConfigDict, where: str = "") -> None:
  """Moves set deprecated keys to their new ones in place, with a DeprecationWarning.

  `replay.budget` -> `replay.fraction` (<= 1) or `replay.tokens` (> 1);
  `mixing.replay_budget` -> `mixing.max_old_share`. A deprecated key set with
  its new key is a ValueError naming both. `where` prefixes the key names.
  """
  replay_schema.upgrade_replay_config(cfg.replay, f"{where}replay")
  mixing_schema.upgrade_mixing_config(cfg.mixing, f"{where}mixing")


def validate_config(cfg: ml_collections.ConfigDict, num_devices: int | None = None,
                    process_count: int = 1) -> None:
  """Raises ValueError naming the offending key; call before compiling.

  Moves deprecated keys to their new ones in `cfg` first (`upgrade_deprecated`).
  """
  unknown = _unknown_keys(cfg, default_config())
  if unknown:
    msgs = []
    for path, siblings in unknown:
      leaf = path.rsplit(".", 1)[-1]
      close = difflib.get_close_matches(leaf, siblings, n=1)
      hint = f" (did you mean '{path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{close[0]}'?)" if close else ""
      msgs.append(f"unknown config key '{path}'{hint}")
    raise ValueError("; ".join(msgs))
  upgrade_deprecated(cfg)
  for bound, groups in ((1, POSITIVE_INTS), (0, NON_NEGATIVE_INTS)):
    for group, keys in groups.items():
      for key in keys:
        if cfg[group][key] < bound:
          raise ValueError(f"{group}.{key}={cfg[group][key]} must be >= {bound}")

  m, t = cfg.model, cfg.train
  if m.num_heads % m.num_kv_heads:
    raise ValueError(f"model.num_heads={m.num_heads} must be a multiple of "
                     f"model.num_kv_heads={m.num_kv_heads}")
  if m.d_model % m.num_heads and not m.head_dim:
    raise ValueError(f"model.d_model={m.d_model} is not divisible by model.num_heads="
                     f"{m.num_heads}; set model.head_dim")
  if m.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype={m.dtype!r}; expected 'float32' or 'bfloat16'")
  if m.attention not in ATTENTION_KINDS:
    raise ValueError(f"model.attention={m.attention!r}; expected one of {ATTENTION_KINDS}")
  if cfg.optimizer.schedule not in LR_SCHEDULES:
    raise ValueError(f"optimizer.schedule={cfg.optimizer.schedule!r}; expected one of "
                     f"{LR_SCHEDULES}")
  if t.steps < 1:
    raise ValueError(f"train.steps={t.steps} must be >= 1")
  if t.on_config_change not in ON_CONFIG_CHANGE:
    raise ValueError(f"train.on_config_change={t.on_config_change!r}; expected one of "
                     f"{ON_CONFIG_CHANGE}")
  if t.lock_stale_minutes < 0:
    raise ValueError(f"train.lock_stale_minutes={t.lock_stale_minutes} must be >= 0 (0: never "
                     "take over another host's lock)")
  if t.grad_accum_steps < 1 or t.global_batch_size % t.grad_accum_steps:
    raise ValueError(f"train.global_batch_size={t.global_batch_size} must be divisible by "
                     f"train.grad_accum_steps={t.grad_accum_steps}")
  if t.global_batch_size % process_count:
    raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  if num_devices is not None:
    shape = shd.resolve_mesh_shape(cfg.sharding.mesh_shape, num_devices)
    dp = shape[0] * shape[1]
    micro = t.global_batch_size // t.grad_accum_steps
    if micro % dp:
      raise ValueError(
          f"train.global_batch_size={t.global_batch_size} (microbatch {micro}) is not divisible "
          f"by the data-parallel size {dp} = data x fsdp of sharding.mesh_shape={shape}")
    tp = shape[2]
    for key in ("num_heads", "num_kv_heads", "mlp_dim"):
      if m[key] % tp:
        raise ValueError(f"model.{key}={m[key]} is not divisible by the tensor axis "
                         f"({tp}) of sharding.mesh_shape={shape}")
  if is_staged(cfg):
    validate_stages(cfg)
    for name in stage_names(cfg):
      data_schema.validate_data_config(stage_config(cfg, name).data)
  else:
    data_schema.validate_data_config(cfg.data)
  mixing_schema.validate_mixing_config(cfg.mixing, log_every=t.log_every)
  replay_schema.validate_replay_config(cfg.replay)
  o = cfg.objective
  if min(o.lambda_kd, o.lambda_replay, o.replay_kd, o.l2sp, o.ewc) < 0:
    raise ValueError("objective.lambda_kd / lambda_replay / replay_kd / l2sp / ewc must be >= 0")
  validate_divergence(t)
  parse_profile_steps(t.profile_steps)
  if t.init_checkpoint and t.init_from_hf:
    raise ValueError("set one of train.init_checkpoint and train.init_from_hf, not both")
  if (o.lambda_kd > 0 or o.replay_kd > 0 or o.l2sp > 0 or o.ewc > 0) \
      and not t.init_checkpoint and not t.init_from_hf \
      and not is_staged(cfg):
    raise ValueError("objective.lambda_kd / replay_kd / l2sp / ewc need a starting model (the "
                     "teacher): "
                     "set train.init_checkpoint, or run them as a stage with init_from")
  if o.get("ewc_fisher", "true") not in ("true", "empirical"):
    raise ValueError(f"objective.ewc_fisher={o.ewc_fisher!r}: expected 'true' (labels sampled "
                     "from the model) or 'empirical' (the data's labels)")
  if o.kd_temperature <= 0:
    raise ValueError(f"objective.kd_temperature={o.kd_temperature} must be > 0")
  decomposition_schema.validate_decomposition_config(cfg.decomposition, "decomposition",
                                                    LR_SCHEDULES)
  for name in (stage_names(cfg) if is_staged(cfg) else ()):
    if "train" in cfg.stages[name]:
      validate_divergence(stage_config(cfg, name).train, f"stages.{name}.train")
    if "decomposition" in cfg.stages[name]:
      decomposition_schema.validate_decomposition_config(
          stage_config(cfg, name).decomposition, f"stages.{name}.decomposition", LR_SCHEDULES)


def validate_divergence(t: ml_collections.ConfigDict, where: str = "train") -> None:
  """`train.on_divergence` / `loss_spike_factor` / `max_rollbacks`, and enough checkpoints
  kept for a rollback to find a good one: the newest good step must still be kept when the
  divergence is found (a spike is found at the end of its log window)."""
  if t.on_divergence not in ON_DIVERGENCE:
    raise ValueError(f"{where}.on_divergence={t.on_divergence!r}; expected one of {ON_DIVERGENCE}")
  if t.loss_spike_factor != 0 and not t.loss_spike_factor > 1:
    raise ValueError(f"{where}.loss_spike_factor={t.loss_spike_factor} must be 0 (off) or > 1")
  if t.max_rollbacks < 0:
    raise ValueError(f"{where}.max_rollbacks={t.max_rollbacks} must be >= 0")
  if t.on_divergence == "rollback":
    spike = -(-t.log_every // t.checkpoint_every) if t.loss_spike_factor else 0
    need = max(2, spike + 1)
    if t.keep_checkpoints < need:
      raise ValueError(
          f"{where}.keep_checkpoints={t.keep_checkpoints}: {where}.on_divergence='rollback' needs "
          f">= {need} (the newest good step is one before the divergence"
          + (f", and before the log window of {t.log_every} steps a spike is found in, "
             f"at {where}.checkpoint_every={t.checkpoint_every})" if spike else ")"))


# ---------------------------------------------------------------- stages


def is_staged(config: ml_collections.ConfigDict) -> bool:
  """Whether the config runs a sequence of stages (`stage_order` / `stages`)."""
  return bool(config.stage_order) or len(config.stages) > 0


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
  schema = default_config()
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
  """The base config with stage `name`'s groups laid over it (and no stages).

  Deprecated keys, the base's and then the stage's, are moved to their new keys.
  """
  out = copy.deepcopy(config)
  defaults = default_config()
  with out.unlocked():
    upgrade_deprecated(out)
    stage = config.stages[name]
    for group in STAGE_GROUPS:
      if group in stage:
        family = REPLACED_TOGETHER.get(group, ())
        if any(k in stage[group] for k in family):
          for key in family:
            out[group][key] = defaults[group][key]
        for key, value in stage[group].items():
          out[group][key] = value
    upgrade_deprecated(out, f"stages.{name}.")
    out.stages = ml_collections.ConfigDict()
    out.stage_order = ""
    out.run_name = name
  return out


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """'a:b' -> (a, b) with 0 <= a < b; '' -> None; raises naming train.profile_steps."""
  if not spec:
    return None
  try:
    a, b = (int(x) for x in spec.split(":"))
  except ValueError:
    raise ValueError(f"train.profile_steps={spec!r}: expected 'a:b' (steps a+1..b)") from None
  if not 0 <= a < b:
    raise ValueError(f"train.profile_steps={spec!r}: expected 0 <= a < b")
  return a, b


def resolve_progress_bar(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of cfg whose train.progress_bar is True only when stderr is a terminal (pods
  and redirected logs get one line per log window instead: hooks.ProgressLog)."""
  out = copy.deepcopy(cfg)
  with out.unlocked():
    out.train.progress_bar = bool(cfg.train.progress_bar) and sys.stderr.isatty()
  return out


# ----------------------------------------------------------------- the key reference

_KEY_LINE = re.compile(r"^\s*(?:c\.)?([A-Za-z_]\w*)\s*=(?!=)\s*(.*?)\s*$")


def _key_comments(source: str) -> dict[str, str]:
  """{key: comment} of a `default_*` function's source.

  A key's comment is the one on its line, continued by the comment-only lines under it
  when the next key has one on its own line too; otherwise such a block (and any block
  above a key without one) describes the key below it.
  """
  entries: list[list] = []  # [name, trailing, above, below]
  block: list[str] = []
  for line in source.splitlines():
    stripped = line.strip()
    if stripped.startswith("#"):
      block.append(stripped.lstrip("#").strip())
      continue
    code, _, trailing = line.partition("  # ")
    m = _KEY_LINE.match(code)
    if not m or not stripped or stripped.startswith(("def ", "return", "\"")):
      block = []
      continue
    trailing = trailing.strip()
    if block and entries and entries[-1][1] and trailing:
      entries[-1][3] += block
      block = []
    entries.append([m.group(1), trailing, block, []])
    block = []
  return {name: " ".join([*above, trailing, *below]).strip()
          for name, trailing, above, below in entries}


def _group_sources() -> list[str]:
  sources = [inspect.getsource(default_config)]
  for module in (data_schema, mixing_schema, replay_schema, decomposition_schema):
    sources += [inspect.getsource(f) for n, f in vars(module).items()
                if n.startswith("default_") and callable(f)]
  return sources


def reference_markdown() -> str:
  """docs/config.md: every key of `default_config()`, its default and its comment."""
  parsed = [_key_comments(s) for s in _group_sources()]
  top = parsed[0]
  lines = ["# Config reference", "",
           "Every key of `cpt_jax.config.default_config()`, its default and the comment it",
           "carries in the schema (`cpt_jax/config.py`, `cpt_jax/schema/`). Generated by",
           "`python -m cpt_jax.config --reference > docs/config.md`; `tests/test_config.py`",
           "fails when this file is stale. Override any key with `--config.group.key=value`.", ""]
  cfg = default_config()
  rows = {}
  for group in cfg.keys():
    value = cfg[group]
    if not isinstance(value, ml_collections.ConfigDict) or group == "stages":
      rows.setdefault("top level", []).append((group, value, top))
      continue
    comments = next((p for p in parsed[1:] if set(value.keys()) <= set(p)), top)
    rows[group] = [(f"{group}.{k}", value[k], comments) for k in value.keys()]
  for section in ["top level", *[g for g in rows if g != "top level"]]:
    lines += [f"## {section}", "", "| key | default | meaning |", "|---|---|---|"]
    for key, value, comments in rows[section]:
      comment = comments.get(key.rsplit(".", 1)[-1], "")
      if not comment:
        raise ValueError(f"config key {key} has no comment in the schema")
      lines.append(f"| `{key}` | `{_show(value)}` | {comment.replace('|', '/')} |")
    lines.append("")
  return "\n".join(lines)


def _show(value: Any) -> str:
  text = repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
  text = text if len(text) <= 60 else text[:57] + "..."
  return text.replace("|", "\\|").replace("`", "'")


if __name__ == "__main__":
  if sys.argv[1:] != ["--reference"]:
    raise SystemExit("usage: python -m cpt_jax.config --reference > docs/config.md")
  sys.stdout.write(reference_markdown())
