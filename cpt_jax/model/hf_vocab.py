"""The tokenizer of a Hugging Face model folder, for the data pipeline.

`tokenizer.model` (SentencePiece) is used as is: its path is a valid
`data.vocab`. A folder with only `tokenizer.json` gets `TokenizerJsonVocab`,
which has `cpt_jax.data.vocab.Vocab`'s interface and needs the `tokenizers`
package. Documents are encoded without special tokens; the pipeline appends
EOS itself, as with the other vocabularies, and the start token of each row
piece is the vocabulary's `bos_id` (the token the tokenizer's own encoding with
special tokens puts first, as the model was trained; `data.add_bos`), given as
the input at position 0 by `cpt_jax.data.packing.rows_to_batch`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np

from cpt_jax import paths
from cpt_jax import tensorflow_cpu


def hf_vocab(path: str) -> str:
  """A `data.vocab` spec for the model folder: its tokenizer.model, else tokenizer.json."""
  for name in ("tokenizer.model", "tokenizer.json"):
    file = os.path.join(path, name)
    if paths.as_path(file).is_file():
      return file
  raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json")


def read_json(path: str) -> dict:
  if not paths.as_path(path).is_file():
    return {}
  return json.loads(paths.as_path(path).read_text())


def _first(x):
  return x[0] if isinstance(x, list) and x else x


def _special_id(tok, folder: str, field: str) -> int | None:
  """`{field}_token_id` from config.json / generation_config.json, else tokenizer_config.json."""
  for file in ("generation_config.json", "config.json"):
    value = _first(read_json(os.path.join(folder, file)).get(f"{field}_token_id"))
    if isinstance(value, int):
      return value
  token = read_json(os.path.join(folder, "tokenizer_config.json")).get(f"{field}_token")
  if isinstance(token, dict):
    token = token.get("content")
  return tok.token_to_id(token) if isinstance(token, str) else None


def _bos_id(tok, folder: str) -> int | None:
  """The BOS the tokenizer puts before a document, or None.

  `add_bos_token` in tokenizer_config.json decides when it is set (its
  `bos_token` is the BOS); otherwise the tokenizer's post-processor does: the one
  token it adds in front of a document when encoding with special tokens.
  """
  config = read_json(os.path.join(folder, "tokenizer_config.json"))
  add = config.get("add_bos_token")
  if add is False:
    return None
  if add is True:
    token = config.get("bos_token")
    token = token.get("content") if isinstance(token, dict) else token
    bos = tok.token_to_id(token) if isinstance(token, str) else None
    if bos is None:
      raise ValueError(f"{folder}/tokenizer_config.json: add_bos_token is true but its "
                       f"bos_token {token!r} is not in the vocabulary")
    return bos
  plain = tok.encode("a", add_special_tokens=False).ids
  special = tok.encode("a", add_special_tokens=True).ids
  for k in range(len(special) - len(plain) + 1):
    if special[k:k + len(plain)] == plain:
      return special[0] if k == 1 else None
  return None


class TokenizerJsonVocab:
  """A `tokenizer.json` (HF `tokenizers`) vocabulary with `Vocab`'s interface."""

  def __init__(self, spec: str):
    if not paths.as_path(spec).is_file():
      raise ValueError(f"data.vocab: tokenizer file {spec!r} not found")
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"data.vocab={spec!r} needs the 'tokenizers' package: "
                        f"pip install 'cpt_jax[hf]'") from e
    self.spec = spec
    data = paths.as_path(spec).read_bytes()
    self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    folder = os.fspath(paths.as_path(spec).parent)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    eos = _special_id(self._tok, folder, "eos")
    if eos is None:
      raise ValueError(f"data.vocab={spec!r}: no eos_token_id in {folder}/config.json or "
                       f"generation_config.json, nor eos_token in tokenizer_config.json")
    self.eos_id = eos
    pad = _special_id(self._tok, folder, "pad")
    self.pad_id = 0 if pad is None else pad
    self.bos_id = _bos_id(self._tok, folder)
    self.key = "hftok:" + hashlib.sha256(data).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes documents; returns (flat tokens_T int32, lengths_O int64)."""
    ids = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
    lengths_O = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    flat_T = np.fromiter((t for x in ids for t in x), np.int32, int(lengths_O.sum()))
    return flat_T, lengths_O

  def seqio_vocabulary(self):
    """A seqio vocabulary over this tokenizer (imports seqio/TensorFlow)."""
    return _seqio_vocabulary(self)


def _seqio_vocabulary(vocab: TokenizerJsonVocab):
  tf = tensorflow_cpu.tensorflow()
  import seqio  # pylint: disable=g-import-not-at-top

  class _Vocabulary(seqio.Vocabulary):
    """seqio view of a TokenizerJsonVocab (TF ops via tf.py_function)."""

    def __init__(self):
      super().__init__(extra_ids=0)

    @property
    def eos_id(self):
      return vocab.eos_id

    @property
    def unk_id(self):
      return None

    @property
    def _base_vocab_size(self):
      return vocab.vocab_size

    def _encode(self, s):
      return vocab.encode(s)

    def _decode(self, ids):
      return vocab.decode([int(i) for i in ids])

    def _encode_tf(self, s):
      out = tf.py_function(lambda t: tf.constant(vocab.encode(t.numpy().decode("utf-8")),
                                                  tf.int32), [s], tf.int32)
      out.set_shape([None])
      return out

    def _decode_tf(self, ids):
      out = tf.py_function(lambda t: vocab.decode(t.numpy().tolist()), [ids], tf.string)
      out.set_shape([])
      return out

    def __eq__(self, other):
      return getattr(other, "key", None) == vocab.key

    def __hash__(self):
      return hash(vocab.key)

    key = vocab.key

  return _Vocabulary()
