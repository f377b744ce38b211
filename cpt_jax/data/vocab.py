"""Vocabularies: seqio's ByteVocabulary (default) or a SentencePiece model file.

`Vocab.encode_batch` tokenises many documents at once without TensorFlow and
returns exactly what the matching seqio vocabulary's `encode` returns (tested).

Every vocabulary declares `bos_id`: the beginning-of-sequence token its
tokenizer puts before a document (a SentencePiece model with a BOS piece, a
tokenizer.json whose post-processor or tokenizer_config.json adds one), or None
(the byte vocabulary). `start_id` turns it and `data.add_bos` into the input
token at the start of every packed row piece (0, seqio's pad, when there is no BOS).
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from cpt_jax import paths
from cpt_jax import tensorflow_cpu
from cpt_jax.model.hf_vocab import TokenizerJsonVocab, read_json
from cpt_jax.schema.data import ADD_BOS

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
      self.bos_id = None  # seqio's byte vocabulary has none: rows start with pad (0)
      self._sp = None
    else:
      if not paths.as_path(spec).is_file():
        raise ValueError(f"data.vocab: SentencePiece model file {spec!r} not found")
      import sentencepiece as spm  # pylint: disable=g-import-not-at-top
      proto = paths.as_path(spec).read_bytes()
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
      self.vocab_size = self._sp.get_piece_size()
      self.eos_id = self._sp.eos_id()
      self.pad_id = max(self._sp.pad_id(), 0)
      # HF's Llama-style SentencePiece tokenizers add the model's BOS unless
      # tokenizer_config.json says add_bos_token: false.
      add = read_json(os.fspath(paths.as_path(spec).parent / "tokenizer_config.json")).get(
          "add_bos_token", True)
      self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 and add else None
      self.key = "spm:" + hashlib.sha256(proto).hexdigest()[:16]

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
    tensorflow_cpu.tensorflow()
    import seqio  # pylint: disable=g-import-not-at-top
    if self._sp is None:
      return seqio.ByteVocabulary()
    return seqio.SentencePieceVocabulary(self.spec)


def make_vocab(spec: str):
  """'byte', a SentencePiece .model path, or a Hugging Face tokenizer.json path."""
  if spec.endswith(".json"):
    return TokenizerJsonVocab(spec)
  return Vocab(spec)


def start_id(vocab, add_bos: str = "auto") -> int:
  """The input token at the start of each packed row piece (`data.add_bos`).

  'auto': the vocabulary's BOS when its tokenizer adds one, else 0; 'yes': its
  BOS (an error naming data.add_bos if it has none); 'no': 0 (seqio's pad).
  """
  if add_bos not in ADD_BOS:
    raise ValueError(f"data.add_bos: {add_bos!r} is not one of {ADD_BOS}")
  bos = getattr(vocab, "bos_id", None)
  if add_bos == "yes" and bos is None:
    raise ValueError(f"data.add_bos='yes' but the vocabulary {vocab.spec!r} has no BOS token; "
                     f"use 'auto' or 'no'")
  return int(bos) if bos is not None and add_bos != "no" else 0
