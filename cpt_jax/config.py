"""The config schema: every key a run may set, its default, and validation.

Config files in `configs/` start from `default_config()` and override fields;
`validate_config` rejects keys the schema does not know and settings that cannot
run (mesh, batch) before anything compiles.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections
from ml_collections import config_dict

from cpt_jax.parallel import sharding as shd


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
      progress_bar=True,  # tqdm progress bar with rate and ETA.
      peak_flops=0.0,  # One device's peak FLOP/s; MFU divides by it x devices (0: measure).
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

  c.data = _data_config()
  from cpt_jax.mixing import config as mixing_config  # pylint: disable=g-import-not-at-top
  c.mixing = mixing_config.default_mixing_config()
  # --- replay selection (cpt_jax/replay) ---
  from cpt_jax.replay import config as replay_config  # pylint: disable=g-import-not-at-top
  c.replay = replay_config.default_replay_config()
  # --- end replay selection ---

  # --- sigma / tau decomposition (cpt_jax/train/decomposition.py) ---
  c.decomposition = config_dict.create(
      mode="",  # '' (off), 'lora' (tau = LoRA adapters) or 'subtree' (tau = delta on leaves).
      targets=r"attn/(q|v)/kernel",  # Regex over param paths ('layers_0/attn/q/kernel'): tau.
      lora_rank=8,  # LoRA rank r.
      lora_alpha=16.0,  # LoRA scale alpha: delta = alpha / r * A @ B.
      routing=True,  # sigma <- replay/distill rows (+ L2-SP/EWC), tau <- new rows.
      freeze_sigma=False,  # sigma gets no gradient and no optimizer state.
      skip_idle_updates=True,  # A group with no signal in a step gets an exactly-zero update.
      tau_lr=-1.0,  # tau's peak LR (<0: optimizer.lr).
      tau_schedule="",  # tau's LR schedule ('': optimizer.schedule).
      tau_warmup_steps=-1,  # tau's warmup (<0: optimizer.warmup_steps).
      tau_weight_decay=-1.0,  # tau's weight decay (<0: optimizer.weight_decay).
      eval_without_tau=True,  # Also evaluate every domain with sigma alone (summary).
  )
  # --- end sigma / tau decomposition ---

  # Stages (continued pre-training): see cpt_jax/stages.py. Empty = one run.
  c.stage_order = ""  # Comma-separated stage names, in run order.
  c.stages = ml_collections.ConfigDict()  # name -> {init_from, data, train, optimizer, ...}
  return c


def _data_config() -> ml_collections.ConfigDict:
  from cpt_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  return data_config.default_data_config()


def _unknown_keys(cfg: Any, schema: Any, prefix: str = "") -> list[tuple[str, list[str]]]:
  out = []
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in schema:
      out.append((path, list(schema.keys())))
      continue
    if path == "stages":  # stage contents are checked by stages.validate_stages
      continue
    sub, ref = cfg[key], schema[key]
    if isinstance(ref, ml_collections.ConfigDict) and isinstance(sub, ml_collections.ConfigDict):
      out += _unknown_keys(sub, ref, path + ".")
  return out


def apply_init_from_hf(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of cfg whose model (and byte vocab) come from `train.init_from_hf`."""
  if not cfg.train.init_from_hf:
    return cfg
  import copy  # pylint: disable=g-import-not-at-top
  from cpt_jax.model import hf  # pylint: disable=g-import-not-at-top
  out = copy.deepcopy(cfg)
  path = cfg.train.init_from_hf
  with out.unlocked():
    keep = {k: out.model[k] for k in ("dtype", "remat", "scan_layers", "attention",
                                      "vocab_pad_multiple", "init_std")}
    out.model.update(hf.hf_model_config(path, seq_len=cfg.data.seq_len))
    out.model.update(keep)
    if out.data.vocab == "byte":
      try:
        out.data.vocab = hf.hf_vocab(path)
      except FileNotFoundError:
        pass  # no tokenizer in the folder: keep the byte vocabulary
  return out


def validate_config(cfg: ml_collections.ConfigDict, num_devices: int | None = None,
                    process_count: int = 1) -> None:
  """Raises ValueError naming the offending key; call before compiling."""
  unknown = _unknown_keys(cfg, default_config())
  if unknown:
    msgs = []
    for path, siblings in unknown:
      leaf = path.rsplit(".", 1)[-1]
      close = difflib.get_close_matches(leaf, siblings, n=1)
      hint = f" (did you mean '{path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{close[0]}'?)" if close else ""
      msgs.append(f"unknown config key '{path}'{hint}")
    raise ValueError("; ".join(msgs))

  m, t = cfg.model, cfg.train
  if m.num_heads % m.num_kv_heads:
    raise ValueError(f"model.num_heads={m.num_heads} must be a multiple of "
                     f"model.num_kv_heads={m.num_kv_heads}")
  if m.d_model % m.num_heads and not m.head_dim:
    raise ValueError(f"model.d_model={m.d_model} is not divisible by model.num_heads="
                     f"{m.num_heads}; set model.head_dim")
  if m.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype={m.dtype!r}; expected 'float32' or 'bfloat16'")
  from cpt_jax.model import transformer  # pylint: disable=g-import-not-at-top
  if m.attention not in transformer.ATTENTION_KINDS:
    raise ValueError(f"model.attention={m.attention!r}; expected one of "
                     f"{transformer.ATTENTION_KINDS}")
  if t.steps < 1:
    raise ValueError(f"train.steps={t.steps} must be >= 1")
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
  from cpt_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  if cfg.stage_order or len(cfg.stages):
    from cpt_jax import stages  # pylint: disable=g-import-not-at-top
    stages.validate_stages(cfg)
    for name in stages.stage_names(cfg):
      data_config.validate_data_config(stages.stage_config(cfg, name).data)
  else:
    data_config.validate_data_config(cfg.data)
  from cpt_jax.mixing import config as mixing_config  # pylint: disable=g-import-not-at-top
  mixing_config.validate_mixing_config(cfg.mixing, log_every=t.log_every)
  from cpt_jax.replay import config as replay_config  # pylint: disable=g-import-not-at-top
  replay_config.validate_replay_config(cfg.replay)  # replay selection
  o = cfg.objective
  if min(o.lambda_kd, o.lambda_replay, o.replay_kd, o.l2sp, o.ewc) < 0:
    raise ValueError("objective.lambda_kd / lambda_replay / replay_kd / l2sp / ewc must be >= 0")
  if t.init_checkpoint and t.init_from_hf:
    raise ValueError("set one of train.init_checkpoint and train.init_from_hf, not both")
  if (o.lambda_kd > 0 or o.replay_kd > 0 or o.l2sp > 0 or o.ewc > 0) \
      and not t.init_checkpoint and not t.init_from_hf \
      and not (cfg.stage_order or len(cfg.stages)):
    raise ValueError("objective.lambda_kd / replay_kd / l2sp / ewc need a starting model (the "
                     "teacher): "
                     "set train.init_checkpoint, or run them as a stage with init_from")
  if o.get("ewc_fisher", "true") not in ("true", "empirical"):
    raise ValueError(f"objective.ewc_fisher={o.ewc_fisher!r}: expected 'true' (labels sampled "
                     "from the model) or 'empirical' (the data's labels)")
  if o.kd_temperature <= 0:
    raise ValueError(f"objective.kd_temperature={o.kd_temperature} must be > 0")
  from cpt_jax.train import decomposition  # pylint: disable=g-import-not-at-top
  decomposition.validate_config(cfg)  # sigma / tau decomposition
