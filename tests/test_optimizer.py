"""Schedules and the weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.train import optimizer
from tests.helpers import tiny_config


def _sched(**kw):
  c = tiny_config().optimizer
  c.update(kw)
  return optimizer.make_schedule(c, 100)


def test_cosine_warms_up_and_decays_to_floor():
  s = _sched(schedule="cosine", lr=1.0, warmup_steps=10, final_lr_fraction=0.1)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
  assert float(s(100)) == pytest.approx(0.1, abs=1e-6)
  assert float(s(50)) < float(s(20))


def test_rewarm_starts_from_init_lr():
  s = _sched(schedule="rewarm_cosine", lr=1.0, init_lr=0.3, warmup_steps=10,
             final_lr_fraction=0.05)
  assert float(s(0)) == pytest.approx(0.3)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(100)) == pytest.approx(0.05, abs=1e-6)


def test_wsd_is_flat_then_decays():
  s = _sched(schedule="wsd", lr=1.0, warmup_steps=10, decay_fraction=0.2,
             final_lr_fraction=0.0)
  assert float(s(10)) == float(s(50)) == float(s(79)) == pytest.approx(1.0)
  assert float(s(90)) == pytest.approx(0.5, abs=1e-6)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-6)


def test_unknown_schedule_names_the_key():
  with pytest.raises(ValueError, match="optimizer.schedule='linear'"):
    _sched(schedule="linear")


def test_decay_mask_skips_norms_and_embeddings():
  params = {"embed": {"embedding": jnp.ones(2)}, "layers_0": {
      "attn_norm": {"scale": jnp.ones(2)}, "attn": {"q": {"kernel": jnp.ones(2),
                                                         "bias": jnp.ones(2)}}}}
  m = optimizer.decay_mask(params, decay_embeddings=False, no_decay_pattern=r"(norm|bias|scale)")
  assert m["layers_0"]["attn"]["q"]["kernel"] is True
  assert not m["layers_0"]["attn"]["q"]["bias"] and not m["layers_0"]["attn_norm"]["scale"]
  assert not m["embed"]["embedding"]
  assert optimizer.decay_mask(params, True, r"(norm|bias|scale)")["embed"]["embedding"]
