r"""The demo: pretrain a tiny M, then continue pre-training on a new domain twice.

Runs on CPU with no download, on text every Python installation has (the
standard library's code, test code, docstrings and pydoc help topics):

  python -m cpt_jax.main --config=configs/demo.py --workdir=/tmp/cpt_demo

Stages:
  pretrain       M on py_code, py_tests and py_docstrings, from scratch.
  cpt_plain      M -> py_help only (no replay): the forgetting baseline.
  cpt_replay_kd  M -> py_help + replay of py_code/py_tests (1 row each of 16), with
                 py_docstrings marked unavailable: only its validation text
                 (2 rows of 16), distilled from M.
Both CPT stages see the same T tokens: 12 py_help rows a step in cpt_replay_kd
(the mixer gives each domain exactly B x weight rows when that is whole) over
320 steps, 16 a step over 240 in cpt_plain: 3,840 rows each.
It prints the comparison (old-domain losses, forgetting, gain on T) and writes
report.json / report.md / plots to the workdir.
"""

from cpt_jax import config as config_lib

OLD = "py_code,py_tests,py_docstrings"
NEW = "py_help"


def get_config():
  c = config_lib.default_config()
  c.model.update(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=512)
  c.data.update(corpus_dir="builtin:stdlib", seq_len=128)
  c.train.update(global_batch_size=16, log_every=25, eval_every=0, eval_batches=8,
                 checkpoint_every=200)
  c.optimizer.update(lr=3e-3, warmup_steps=30, final_lr_fraction=0.1)

  c.stage_order = "pretrain,cpt_plain,cpt_replay_kd"
  c.stages.pretrain = {"data": {"new": OLD}, "train": {"steps": 600}}
  cpt_opt = {"schedule": "rewarm_cosine", "lr": 2e-3, "init_lr": 3e-4, "warmup_steps": 20}
  c.stages.cpt_plain = {
      "init_from": "pretrain", "data": {"new": NEW}, "train": {"steps": 240},
      "optimizer": cpt_opt}
  c.stages.cpt_replay_kd = {
      "init_from": "pretrain",
      "data": {"new": NEW, "replay": "py_code,py_tests", "distill": "py_docstrings",
               "weights": "py_help=0.75,py_code=0.0625,py_tests=0.0625,py_docstrings=0.125"},
      "objective": {"lambda_kd": 1.0, "kd_temperature": 1.0},
      "train": {"steps": 320}, "optimizer": cpt_opt}
  return c
