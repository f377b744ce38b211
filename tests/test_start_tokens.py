"""Start tokens: each document starts with its vocabulary's BOS as the tokenizer encodes it."""

import json

import numpy as np
import pytest

from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.data import vocab as vocab_lib
from tests import helpers

tokenizers = pytest.importorskip("tokenizers", reason="tokenizers not installed (.[hf] extra)")

WORDS = ["<pad>", "<s>", "</s>", "[UNK]", "the", "quick", "brown", "fox", "jumps", "over",
         "lazy", "dog"]
DOCS = ["the quick brown fox", "jumps over the lazy dog", "fox", "the dog jumps over the fox",
        "lazy lazy dog"]


def write_tokenizer(folder, *, template: bool = True, tokenizer_config: dict | None = None):
  """A Llama-style tokenizer.json: its post-processor puts <s> before every document."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<pad>", "<s>", "</s>"])
  if template:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  config = {"eos_token": "</s>", "bos_token": "<s>", **(tokenizer_config or {})}
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return tok, str(folder / "tokenizer.json")


def corpus(root):
  for split in ("train", "validation"):
    path = root / "alpha" / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n"
                            for i, t in enumerate(DOCS)))
  return root


def pipeline(tmp_path, vocab, **data):
  c = helpers.tiny_config()
  c.data.update(corpus_dir=str(corpus(tmp_path / "corpus")), vocab=vocab, new="alpha",
                replay="", seq_len=16, eval_holdout=0.0, cache_dir=str(tmp_path / "cache"),
                **data)
  return pipeline_lib.Pipeline(c.data, global_batch_size=8)


def documents_of(batch):
  """(inputs, targets) of every document piece, row by row in segment order."""
  out = []
  for i in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][i]
    for s in range(1, int(seg.max(initial=0)) + 1):
      out.append((batch["inputs"][i][seg == s].tolist(), batch["targets"][i][seg == s].tolist()))
  return out


def test_packed_rows_equal_the_tokenizer_with_special_tokens(tmp_path):
  tok, spec = write_tokenizer(tmp_path / "tok")
  p = pipeline(tmp_path, spec)
  assert p.vocab.bos_id == 1 and p.start_id == 1
  batch = next(p.eval_batches("alpha", 8))
  got = documents_of(batch)
  assert len(got) == len(DOCS)
  for (inputs, targets), text in zip(got, DOCS):
    with_special = tok.encode(text, add_special_tokens=True).ids
    assert with_special[0] == 1
    assert inputs == with_special  # [BOS, t1 .. tn] as the tokenizer encodes the document
    assert targets == with_special[1:] + [p.vocab.eos_id]  # [t1 .. tn, EOS]
  # Padding stays 0 and outside the loss.
  pad = batch["segment_ids"] == 0
  assert (batch["inputs"][pad] == 0).all() and (batch["loss_weights"][pad] == 0).all()
  # Training batches (mixer) start documents with BOS too.
  train = p.next_batch()
  starts = (train["positions"] == 0) & (train["segment_ids"] > 0)
  assert starts.any() and (train["inputs"][starts] == 1).all()
  p.close()


def test_add_bos_no_and_tokenizers_without_bos_start_with_zero(tmp_path):
  _, spec = write_tokenizer(tmp_path / "tok")
  p = pipeline(tmp_path, spec, add_bos="no")
  assert p.start_id == 0
  first = documents_of(next(p.eval_batches("alpha", 8)))[0][0]
  assert first[0] == 0
  p.close()
  _, plain = write_tokenizer(tmp_path / "plain", template=False)
  assert vocab_lib.make_vocab(plain).bos_id is None
  _, told = write_tokenizer(tmp_path / "told", template=False,
                            tokenizer_config={"add_bos_token": True})
  assert vocab_lib.make_vocab(told).bos_id == 1
  _, off = write_tokenizer(tmp_path / "off", tokenizer_config={"add_bos_token": False})
  assert vocab_lib.make_vocab(off).bos_id is None


def test_byte_vocabulary_keeps_zero_and_yes_needs_a_bos(tmp_path):
  byte = vocab_lib.make_vocab("byte")
  assert byte.bos_id is None
  assert vocab_lib.start_id(byte, "auto") == 0 == vocab_lib.start_id(byte, "no")
  with pytest.raises(ValueError, match=r"data\.add_bos='yes'.*no BOS"):
    vocab_lib.start_id(byte, "yes")
  with pytest.raises(ValueError, match=r"data\.add_bos"):
    pipeline(tmp_path, "byte", add_bos="maybe")
  p = pipeline(tmp_path, "byte")
  batch = next(p.eval_batches("alpha", 8))
  starts = batch["positions"] == 0
  assert (batch["inputs"][starts] == 0).all()
  first = documents_of(batch)[0]
  assert first[0] == ([0] + [b + vocab_lib.BYTE_OFFSET for b in DOCS[0].encode()])[:16]
  p.close()
