"""The config schema: every key a run may set, its default, validation, and stages.

Config files in `configs/` start from `default_config()` and override fields;
`validate_config` rejects keys the schema does not know and settings that cannot
run (mesh, batch) before anything compiles. The groups `train`, `data`, `mixing`,
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
from cpt_jax.schema import train as train_schema
from cpt_jax.schema.train import validate_divergence

ATTENTION_KINDS = ("native", "dot_product", "cudnn")  # model.attention
LR_SCHEDULES = ("constant", "cosine", "rewarm_cosine", "wsd")  # optimizer.schedule
PROJECTIONS = ("", "old", "new", "both")  # objective.projection (train/projection.py)
OLD_MOMENTS = ("shared", "separate")  # optimizer.old_moments (train/split_moments.py)
KD_TOKENS = ("all", "forgotten")  # objective.kd_tokens (train/objective.py)
# Integer keys that must be >= 1 / >= 0 (checked first, so later checks may divide by them).
POSITIVE_INTS = {"model": ("vocab_size", "vocab_pad_multiple", "d_model", "num_layers",
                           "num_heads", "num_kv_heads", "mlp_dim"),
                 "train": ("global_batch_size", "log_every", "checkpoint_every",
                           "keep_checkpoints")}
NON_NEGATIVE_INTS = {"model": ("head_dim",), "train": ("eval_every", "eval_batches"),
                     "objective": ("kd_topk",), "replay": ("score_batch",)}
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
  c.seed = 0  # Parameter init and the rows of the Fisher / reference losses; data order: data.seed.
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
      remat="none",  # 'none', 'full', 'dots', 'dots_no_batch', 'dots_no_batch_attention'.
      scan_layers=False,  # nn.scan over layers (faster compiles for deep models).
      attention="native",  # 'native' (einsum; best on CPU), 'dot_product' or 'cudnn' (GPU).
  )

  c.train = train_schema.default_train_config()

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
      # 'shared': one AdamW on the whole loss; 'separate': T's gradient and the old
      # signal's (replay, KD, L2-SP / EWC) each get their own clipping and moments
      # (train/split_moments.py).
      old_moments="shared",
      old_lr_scale=1.0,  # old_moments='separate': the old signal's lr as a multiple of lr.
      # k > 0: Lookahead (Reptile across batches): every k steps the weights move back to
      # slow + lookahead_alpha * (fast - slow); one more copy of the params (train/optimizer.py).
      lookahead_every=0,
      lookahead_alpha=0.5,  # lookahead_every > 0: the slow weights' step, in (0, 1].
  )

  c.objective = config_dict.create(
      lambda_replay=1.0,  # Weight of CE on replay rows (1.0 = plain mixing).
      lambda_kd=0.0,  # Weight of KL(teacher || student) on distill rows.
      replay_kd=0.0,  # Weight of KL(teacher || student) on replay rows, added to their CE.
      # q in [-1, 1]: replay_kd's weight linear over the stage, (1 - q) -> (1 + q) times
      # replay_kd (mean replay_kd); 1 rises from 0, -1 falls to 0 (train/objective.py).
      replay_kd_ramp=0.0,
      # p: a replay row's KL weighs 2 sigmoid(p (g - g0)), g its forgetting (mean CE under
      # the student minus under the teacher, nats per token: the `online` score), g0 =
      # replay_kd_focus_center; p > 0 favours the most forgotten rows, p < 0 the least;
      # 0: every row weighs 1 (train/objective.py).
      replay_kd_focus=0.0,
      replay_kd_focus_center=0.0,  # g0 (nats per token): the forgetting that weighs 1.
      # w > 0 (needs replay_kd > 0): also hold the blocks' outputs on the replay rows near
      # the teacher's, w x mean over the held blocks (replay_features_blocks; default every
      # block) of max(0, relative squared error - margin) per token (train/objective.py,
      # residual_gap).
      replay_features=0.0,
      replay_features_margin=0.0,  # m >= 0: the relative error each block may drift freely.
      # Which blocks' outputs replay_features holds, and how much each: '' every block
      # alike, else comma-separated indices (0 the first block, -1 the last), each with an
      # optional relative weight: '0,1' the lower two of four, '0:2,1:2,2,3' all four with
      # the lower two counted twice (the term is the weighted mean over the named blocks).
      replay_features_blocks="",
      kd_temperature=1.0,  # Distillation temperature tau (term scaled by tau^2).
      kd_topk=0,  # >0: KL over the teacher's top-k tokens plus a tail bucket.
      # Which tokens of the teacher's rows the KL covers: 'all', or 'forgotten' (only where
      # the student's CE on the next token exceeds the teacher's; train/objective.py).
      kd_tokens="all",
      l2sp=0.0,  # L2-SP pull toward the stage's starting params.
      ewc=0.0,  # EWC strength (diagonal Fisher).
      ewc_batches=4,  # Batches used to estimate the Fisher.
      ewc_fisher="true",  # 'true': labels sampled from the model; 'empirical': the data's.
      # Gradient projection when T's and the old signal's gradients conflict
      # (train/projection.py): '' off, 'old' (the old signal's), 'new' (T's: A-GEM),
      # 'both' (PCGrad).
      projection="",
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


def feature_blocks(spec: str, num_layers: int) -> dict[int, float]:
  """{block index in [0, K): relative weight} that `objective.replay_features_blocks` =
  `spec` names.

  '' is every block at weight 1; otherwise comma-separated entries `i` (weight 1) or
  `i:w` (weight w > 0), negative indices from the top (-1 the last block). Repeated or
  out-of-range indices and weights <= 0 are a ValueError naming the key.
  """
  if not spec:
    return {k: 1.0 for k in range(num_layers)}
  key = f"objective.replay_features_blocks={spec!r}"
  out: dict[int, float] = {}
  for entry in str(spec).split(","):
    index, _, weight = entry.partition(":")
    try:
      i, w = int(index), float(weight) if weight else 1.0
    except ValueError:
      raise ValueError(f"{key}: expected comma-separated block indices, each with an "
                       "optional weight, such as '0,1', '-1' or '0:2,1:2,2,3'") from None
    if not -num_layers <= i < num_layers:
      raise ValueError(f"{key}: the model has {num_layers} blocks (model.num_layers), "
                       f"indices {-num_layers}..{num_layers - 1}")
    if not w > 0:
      raise ValueError(f"{key}: block {i}'s weight {w} must be > 0")
    if i % num_layers in out:
      raise ValueError(f"{key} names a block twice")
    out[i % num_layers] = w
  return out


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
  train_schema.validate_train_config(t, process_count)
  if num_devices is not None:
    shape = shd.resolve_mesh_shape(cfg.sharding.mesh_shape, num_devices)
    dp = shape[0] * shape[1]
    micro = t.global_batch_size // t.grad_accum_steps
    if micro % dp:
      raise ValueError(
          f"train.global_batch_size={t.global_batch_size} (microbatch {micro}) is not divisible "
          f"by the data-parallel size {dp} = data x fsdp of sharding.mesh_shape={shape}")
    score = cfg.replay.get("score_batch", 0)
    if score % dp:
      raise ValueError(f"replay.score_batch={score} is not divisible by the data-parallel "
                       f"size {dp} = data x fsdp of sharding.mesh_shape={shape}")
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
  if cfg.replay.ramp and cfg.mixing.controller != "static":
    raise ValueError(f"replay.ramp={cfg.replay.ramp} sets the replay share over the stage, and "
                     f"mixing.controller={cfg.mixing.controller!r} sets the weights too: use one "
                     "(the ramp needs controller 'static')")
  o = cfg.objective
  if min(o.lambda_kd, o.lambda_replay, o.replay_kd, o.l2sp, o.ewc) < 0:
    raise ValueError("objective.lambda_kd / lambda_replay / replay_kd / l2sp / ewc must be >= 0")
  if (o.lambda_kd > 0 or o.replay_kd > 0 or o.l2sp > 0 or o.ewc > 0) \
      and not t.init_checkpoint and not t.init_from_hf \
      and not is_staged(cfg):
    raise ValueError("objective.lambda_kd / replay_kd / l2sp / ewc need a starting model (the "
                     "teacher): "
                     "set train.init_checkpoint or train.init_from_hf, or run them as a "
                     "stage that continues another (stages.<name>.init_from)")
  if o.get("ewc_fisher", "true") not in ("true", "empirical"):
    raise ValueError(f"objective.ewc_fisher={o.ewc_fisher!r}: expected 'true' (labels sampled "
                     "from the model) or 'empirical' (the data's labels)")
  if o.get("projection", "") not in PROJECTIONS:
    raise ValueError(f"objective.projection={o.projection!r}: expected one of {PROJECTIONS}")
  if o.get("projection", "") and cfg.decomposition.mode:
    raise ValueError("objective.projection needs the plain layout: decomposition.mode="
                     f"{cfg.decomposition.mode!r} routes the two signals itself")
  old_moments = cfg.optimizer.get("old_moments", "shared")
  if old_moments not in OLD_MOMENTS:
    raise ValueError(f"optimizer.old_moments={old_moments!r}: expected one of {OLD_MOMENTS}")
  if old_moments == "separate" and (o.get("projection", "") or cfg.decomposition.mode):
    raise ValueError("optimizer.old_moments='separate' needs the plain layout without "
                     "objective.projection or decomposition.mode: they take the two "
                     "signals' gradients themselves")
  every = cfg.optimizer.get("lookahead_every", 0)
  if not isinstance(every, int) or every < 0:
    raise ValueError(f"optimizer.lookahead_every={every!r} must be an int >= 0 (0: off)")
  if every and not 0.0 < cfg.optimizer.get("lookahead_alpha", 0.5) <= 1.0:
    raise ValueError(f"optimizer.lookahead_alpha={cfg.optimizer.lookahead_alpha} must be in "
                     "(0, 1]")
  if not every and cfg.optimizer.get("lookahead_alpha", 0.5) != 0.5:
    raise ValueError(f"optimizer.lookahead_alpha={cfg.optimizer.lookahead_alpha} is the step "
                     "of Lookahead's slow weights, which optimizer.lookahead_every=0 turns "
                     "off: set lookahead_every > 0 or leave the alpha at 0.5")
  if every and old_moments == "separate":
    raise ValueError("optimizer.lookahead_every needs optimizer.old_moments='shared': the "
                     "separate moments' two updates are summed after their optimizers")
  if every and cfg.decomposition.mode and cfg.decomposition.get("skip_idle_updates", True):
    raise ValueError("optimizer.lookahead_every with decomposition.mode="
                     f"{cfg.decomposition.mode!r} needs decomposition.skip_idle_updates=False: "
                     "a zeroed idle step would drop Lookahead's pull-back but keep its slow "
                     "weights")
  old_lr_scale = cfg.optimizer.get("old_lr_scale", 1.0)
  if old_lr_scale < 0:
    raise ValueError(f"optimizer.old_lr_scale={old_lr_scale} must be >= 0")
  if old_lr_scale != 1.0 and old_moments != "separate":
    raise ValueError(f"optimizer.old_lr_scale={old_lr_scale} scales the old signal's own "
                     "optimizer, which only optimizer.old_moments='separate' has (it is "
                     f"{old_moments!r}): set old_moments='separate' or old_lr_scale=1")
  ramp = o.get("replay_kd_ramp", 0.0)
  if not -1.0 <= ramp <= 1.0:
    raise ValueError(f"objective.replay_kd_ramp={ramp} must be in [-1, 1]")
  if ramp and o.replay_kd <= 0:
    raise ValueError(f"objective.replay_kd_ramp={ramp} shapes the replay rows' KL over the "
                     "stage, which objective.replay_kd=0 turns off: set replay_kd > 0 or "
                     "the ramp to 0")
  if o.lambda_kd <= 0 and o.ewc <= 0 and data_schema.split_list(cfg.data.distill):
    raise ValueError(f"data.distill={cfg.data.distill!r}: distill rows are trained by their "
                     "KL to the teacher alone, which objective.lambda_kd=0 turns off (and "
                     "objective.ewc=0 takes no Fisher from them): set lambda_kd > 0, or move "
                     "the domains to data.replay or data.eval")
  focus = o.get("replay_kd_focus", 0.0)
  if focus and o.replay_kd <= 0:
    raise ValueError(f"objective.replay_kd_focus={focus} weighs the replay rows' KL, which "
                     "objective.replay_kd=0 turns off: set replay_kd > 0 or the focus to 0")
  if o.get("replay_kd_focus_center", 0.0) and not focus:
    raise ValueError(f"objective.replay_kd_focus_center={o.replay_kd_focus_center} centres "
                     "the focus's row weights, which objective.replay_kd_focus=0 turns off")
  features, margin = o.get("replay_features", 0.0), o.get("replay_features_margin", 0.0)
  if features < 0 or margin < 0:
    raise ValueError(f"objective.replay_features={features} and objective."
                     f"replay_features_margin={margin} must be >= 0")
  if features and o.replay_kd <= 0:
    raise ValueError(f"objective.replay_features={features} compares the replay rows' block "
                     "outputs with the teacher's, which runs on them only under "
                     "objective.replay_kd > 0: set replay_kd > 0 or replay_features to 0")
  if margin and not features:
    raise ValueError(f"objective.replay_features_margin={margin} is the "
                     "margin of objective.replay_features=0, which is off")
  blocks = o.get("replay_features_blocks", "")
  if blocks and not features:
    raise ValueError(f"objective.replay_features_blocks={blocks!r} picks the blocks of "
                     "objective.replay_features=0, which is off")
  feature_blocks(blocks, cfg.model.num_layers)
  if o.get("kd_tokens", "all") not in KD_TOKENS:
    raise ValueError(f"objective.kd_tokens={o.kd_tokens!r}: expected one of {KD_TOKENS}")
  if o.lambda_kd <= 0 and o.replay_kd <= 0:
    if o.get("kd_tokens", "all") != "all":
      raise ValueError(f"objective.kd_tokens={o.kd_tokens!r} picks the tokens of a KL term, "
                       "and objective.lambda_kd = replay_kd = 0 turn both off")
    if o.kd_topk:
      raise ValueError(f"objective.kd_topk={o.kd_topk} restricts a KL term to the teacher's "
                       "top tokens, and objective.lambda_kd = replay_kd = 0 turn both off")
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
  for module in (train_schema, data_schema, mixing_schema, replay_schema, decomposition_schema):
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
