r"""The throughput benchmark's headline shape as a training config.

d_model 256, 4 layers, 4 heads, MLP 1024, rows of 256 bytes, batch 16, float32,
on the shared corpora (man_en, code_py):

  python -m cpt_jax.main --config=configs/throughput.py --workdir=/tmp/cpt_tp
  python benchmarks/throughput.py          # the same shape, timed in isolation
"""

from cpt_jax import config as config_lib


def get_config():
  c = config_lib.default_config()
  c.model.update(d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=1024)
  c.data.update(new="man_en", replay="code_py", seq_len=256)
  c.train.update(steps=100, global_batch_size=16, log_every=10, checkpoint_every=50)
  return c
