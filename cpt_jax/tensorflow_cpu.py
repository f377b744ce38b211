"""TensorFlow for data code only: imported lazily, with GPUs and TPUs hidden from it.

Data code uses TensorFlow (tf.data for TFRecord / TFDS sources, seqio Tasks and
vocabularies) on the host CPU. Left alone, TensorFlow claims every GPU it sees and
reserves most of its memory, which JAX on the same GPUs then lacks. Every lazy import
of TensorFlow, seqio or TFDS in the project goes through `tensorflow()` first.
"""

from __future__ import annotations

import functools


@functools.cache
def tensorflow():
  """The `tensorflow` module, with no GPU or TPU visible to it (once per process)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except RuntimeError:  # TensorFlow's devices already initialised: too late to hide
      pass
  return tf
