"""Vocabularies: seqio's ByteVocabulary (default) or a SentencePiece model file.

`Vocab.encode_batch` tokenises many documents at once without TensorFlow and
returns exactly what the matching seqio vocabulary's `encode` returns (tested).
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from cpt_jax.model.hf_vocab import TokenizerJsonVocab

BYTE_OFFSET = 3  # seqio.ByteVocabulary: pad=0, eos=1, unk=2, byte b -> b + 3.


class Vocab:
  """A tokenizer with a batch encoder and a cache key."""

  def __init__(self, spec: str = "byte"):
    self.spec = spec
    if spec == "byte":
      self.vocab_size = 256 + BYTE_OFFSET
      self.eos_id = 1
      self.pad_id = 0
      self.key = "byte"
      self._sp = None
    else:
      if not os.path.isfile(spec):
        raise ValueError(f"data.vocab: SentencePiece model file {spec!r} not found")
      import sentencepiece as spm  # pylint: disable=g-import-not-at-top
      self._sp = spm.SentencePieceProcessor(model_file=spec)
      self.vocab_size = self._sp.get_piece_size()
      self.eos_id = self._sp.eos_id()
      self.pad_id = max(self._sp.pad_id(), 0)
      with open(spec, "rb") as f:
        self.key = "spm:" + hashlib.sha256(f.read()).hexdigest()[:16]

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes documents; returns (flat tokens_T int32, lengths_O int64)."""
    if self._sp is None:
      bs = [t.encode("utf-8") for t in texts]
      lengths_O = np.fromiter((len(b) for b in bs), np.int64, len(bs))
      flat_T = np.frombuffer(b"".join(bs), np.uint8).astype(np.int32) + BYTE_OFFSET
      return flat_T, lengths_O
    ids = self._sp.encode(list(texts))
    lengths_O = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    flat_T = np.fromiter((t for x in ids for t in x), np.int32, int(lengths_O.sum()))
    return flat_T, lengths_O

  def seqio_vocabulary(self):
    """The equivalent seqio vocabulary (imports seqio)."""
    import seqio  # pylint: disable=g-import-not-at-top
    if self._sp is None:
      return seqio.ByteVocabulary()
    return seqio.SentencePieceVocabulary(self.spec)


def make_vocab(spec: str):
  """'byte', a SentencePiece .model path, or a Hugging Face tokenizer.json path."""
  if spec.endswith(".json"):
    return TokenizerJsonVocab(spec)
  return Vocab(spec)
