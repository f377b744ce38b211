r"""A tiny byte-level model on the builtin corpus (Python's own standard library).

Smoke test of the whole stack in about a minute on a laptop CPU:

  python -m cpt_jax.main --config=configs/tiny.py --workdir=/tmp/cpt_tiny
"""

from cpt_jax import config as config_lib


def get_config():
  c = config_lib.default_config()
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  c.data.update(corpus_dir="builtin:stdlib", new="py_code", replay="py_help,py_docstrings",
                seq_len=128)
  c.train.update(steps=40, global_batch_size=8, log_every=10, checkpoint_every=20)
  c.optimizer.update(lr=3e-3, warmup_steps=5)
  return c
