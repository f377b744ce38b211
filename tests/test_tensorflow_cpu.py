"""Data code's TensorFlow sees no GPU or TPU (JAX keeps the accelerators' memory)."""

import pytest

from cpt_jax import tensorflow_cpu
from cpt_jax.data import vocab as vocab_lib

tf = pytest.importorskip("tensorflow")


def test_tensorflow_is_given_no_accelerator(monkeypatch):
  hidden = []
  monkeypatch.setattr(tf.config, "set_visible_devices",
                      lambda devices, kind: hidden.append((list(devices), kind)))
  tensorflow_cpu.tensorflow.cache_clear()
  vocab_lib.make_vocab("byte").seqio_vocabulary()  # a data path that loads seqio / TF
  assert ([], "GPU") in hidden and ([], "TPU") in hidden
  vocab_lib.make_vocab("byte").seqio_vocabulary()
  assert len(hidden) == 2  # once per process
  tensorflow_cpu.tensorflow.cache_clear()
