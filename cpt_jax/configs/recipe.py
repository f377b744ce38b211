"""Continued pre-training of a real Hugging Face model: the shared recipe.

`llama3_2_1b.py` and `qwen2_5_0_5b.py` call `cpt_recipe` with their model's
folder and a preset chosen by the config argument (big_vision style):

  python -m cpt_jax.main --config=configs/llama3_2_1b.py:v5e-8 --workdir=...

Every preset is the same recipe on other hardware: the weights imported from the
HF folder (`train.init_from_hf`: architecture, tokenizer, BOS), bfloat16 compute
with float32 parameters and AdamW state, full rematerialisation, FSDP over every
device (mesh (1, -1, 1)), 95% new data and 5% replay of old data, each replayed
row also distilled from the starting model (`objective.replay_kd`), and distill
domains (old data that is gone) matched by KL (`objective.lambda_kd`).

Where the values come from:
- Re-warm then re-decay (`optimizer.schedule='rewarm_cosine'`): warm up linearly
  for 1% of the steps to the pretraining's peak LR and decay by cosine to 10% of
  it; with 5% replay this matched re-training from scratch on the union of the
  data for a weak distribution shift (Ibrahim et al. 2024, "Simple and Scalable
  Strategies to Continually Pre-train Large Language Models", TMLR,
  arXiv:2403.08763: 405M and 10B models, 1% / 5% replay for weak shifts, 25% for
  strong ones). Gupta et al. 2023 ("Continual Pre-Training of Large Language
  Models: How to (re)warm your model?", arXiv:2308.04014) found that re-warming
  is needed to adapt and that the warm-up length matters little, while a higher
  peak LR adapts more and forgets more.
- Peak LR 3e-4 (the recipe's `lr`): the Llama 3 family's pretraining peak (Llama 3
  8B, "The Llama 3 Herd of Models", 2024) and Ibrahim et al.'s 405M model's peak;
  pass a lower `--config.optimizer.lr` to forget less.
- Distillation of replayed rows (dark-experience replay): this project's suite
  (README, "replay_kd") keeps 1% replay's forgetting down at 0.3% extra FLOPs.

Domains: put your corpus in `<corpus_dir>/<domain>/{train,validation}.jsonl` and
set `data.new`, `data.replay` (old data you still have), `data.distill` (old data
that is gone: its validation rows are distilled) and `data.weights` to match
(the defaults: `new` and `old`, weighted 0.95 / 0.05).
"""

from __future__ import annotations

import ml_collections

from cpt_jax import config as config_lib

PRESETS = ("v5e-8", "8xh100", "cpu-smoke")
# Per preset: (sequence length, global batch rows, gradient accumulation, steps, attention).
# 256 rows x 2048 tokens = 0.5M tokens a step; 2,000 steps = 1B tokens.
HARDWARE = {
    "v5e-8": (2048, 256, 8, 2000, "native"),  # 16 GiB HBM per chip: microbatch 4 / chip
    "8xh100": (2048, 256, 2, 2000, "cudnn"),  # 80 GiB per GPU: microbatch 16 / GPU
    "cpu-smoke": (64, 16, 2, 6, "native"),  # the same recipe in seconds on CPU (tests)
}
NEW, OLD = "new", "old"


def cpt_recipe(arg: str | None, hf_path: str, *, lr: float = 3e-4,
               replay_share: float = 0.05) -> ml_collections.ConfigDict:
  """The recipe for the model folder `hf_path` on the preset `arg`."""
  preset = arg or "8xh100"
  if preset not in HARDWARE:
    raise ValueError(f"config argument {preset!r}: expected one of {PRESETS}")
  seq_len, batch, accum, steps, attention = HARDWARE[preset]
  c = config_lib.default_config()
  c.train.update(init_from_hf=hf_path, steps=steps, global_batch_size=batch,
                 grad_accum_steps=accum, log_every=max(1, min(50, steps // 3)),
                 eval_every=max(1, min(500, steps)), eval_batches=8 if preset != "cpu-smoke" else 1,
                 checkpoint_every=min(500, steps), keep_checkpoints=2)
  c.model.update(dtype="bfloat16", remat="full", attention=attention)
  c.sharding.mesh_shape = (1, -1, 1)  # FSDP over every device
  c.data.update(new=NEW, replay=OLD, seq_len=seq_len,
                weights=f"{NEW}={1 - replay_share:g},*={replay_share:g}")
  c.optimizer.update(schedule="rewarm_cosine", lr=lr, init_lr=0.0,
                     warmup_steps=max(1, steps // 100), final_lr_fraction=0.1,
                     weight_decay=0.1)
  c.objective.update(replay_kd=1.0, lambda_kd=1.0, kd_temperature=1.0)
  if preset == "cpu-smoke":
    c.data.update(weights=f"{NEW}=0.75,*=0.25", prefetch=0)
    c.train.update(progress_bar=False, async_checkpoints=False)
  return c
