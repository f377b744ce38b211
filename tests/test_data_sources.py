"""Sources (JSONL, text, TFRecord, TFDS), vocabularies, seqio Tasks and bad input."""

import json
import os

import numpy as np
import pytest

from cpt_jax import batch as batch_lib
from cpt_jax.schema import data as config_lib
from cpt_jax.data import convert as convert_lib
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.data import vocab as vocab_lib

L = 64
TEXTS = {
    "alpha": [f"alpha document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1)
              for i in range(30)] + ["Ünïcödé ✓ 日本語 " * 20],
    "beta": [f"beta {i} " + "the quick brown fox jumps " * (i % 5 + 1) for i in range(20)],
}


def write_jsonl(path, texts):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for i, t in enumerate(texts):
      f.write(json.dumps({"id": f"{i:04d}", "text": t}, ensure_ascii=False) + "\n")


@pytest.fixture
def corpus(tmp_path):
  for d, texts in TEXTS.items():
    write_jsonl(str(tmp_path / "corpus" / d / "train.jsonl"), texts)
    write_jsonl(str(tmp_path / "corpus" / d / "validation.jsonl"), texts[:5])
  return tmp_path


def make_cfg(tmp_path, **kw):
  cfg = config_lib.default_data_config()
  cfg.corpus_dir = str(tmp_path / "corpus")
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.seq_len = L
  cfg.prefetch = 0
  cfg.new = "alpha"
  cfg.replay = "beta"
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def all_rows(p, split="train"):
  """Every stored row of every domain, as targets arrays, in store order."""
  return {d: p._store(d, split).rows_3xRxL[0].copy() for d in p.domains}  # pylint: disable=protected-access


def take(p, n=5):
  bs = [p.next_batch() for _ in range(n)]
  for b in bs:
    batch_lib.check_batch(b, L)
  return bs


# -- vocabularies ---------------------------------------------------------------


def test_byte_vocab_matches_seqio():
  import seqio
  v = vocab_lib.Vocab("byte")
  texts = ["héllo\x00", "", "日本", "plain"]
  flat, lens = v.encode_batch(texts)
  ref = [seqio.ByteVocabulary().encode(t) for t in texts]
  np.testing.assert_array_equal(flat, np.concatenate([np.asarray(r, np.int64) for r in ref]))
  np.testing.assert_array_equal(lens, [len(r) for r in ref])
  assert v.eos_id == seqio.ByteVocabulary().eos_id and v.vocab_size == 259


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  import sentencepiece as spm
  d = tmp_path_factory.mktemp("spm")
  text = d / "text.txt"
  text.write_text("\n".join(t for ts in TEXTS.values() for t in ts) * 3, encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(d / "m"), vocab_size=120, model_type="unigram",
      character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  return str(d / "m.model")


def test_sentencepiece_vocab_matches_seqio_and_pipeline(corpus, spm_model):
  import seqio
  v = vocab_lib.Vocab(spm_model)
  texts = TEXTS["alpha"][:4] + TEXTS["alpha"][-1:]
  flat, lens = v.encode_batch(texts)
  sv = seqio.SentencePieceVocabulary(spm_model)
  ref = [sv.encode(t) for t in texts]
  np.testing.assert_array_equal(flat, np.concatenate(ref))
  np.testing.assert_array_equal(lens, [len(r) for r in ref])
  assert v.eos_id == sv.eos_id == 1 and v.vocab_size == sv.vocab_size
  p = pipeline_lib.make_pipeline(make_cfg(corpus, vocab=spm_model), global_batch_size=4)
  b = take(p)[0]
  assert b["targets"].max() < v.vocab_size
  row = b["targets"][0][b["segment_ids"][0] == 1]
  assert sv.decode(row[row != 1].tolist())  # decodes to text
  # A different vocabulary gets its own cache entry.
  q = pipeline_lib.make_pipeline(make_cfg(corpus), global_batch_size=4)
  assert p._store("alpha", "train").path != q._store("alpha", "train").path  # pylint: disable=protected-access


# -- sources ------------------------------------------------------------------


def test_jsonl_rows_hold_every_document(corpus):
  p = pipeline_lib.make_pipeline(make_cfg(corpus), global_batch_size=4)
  rows = all_rows(p)["alpha"]
  st = p._store("alpha", "train")  # pylint: disable=protected-access
  seg = st.rows_3xRxL[1]
  flat = rows[seg > 0]
  v = vocab_lib.Vocab("byte")
  want = np.concatenate([np.append(v.encode_batch([t])[0], v.eos_id) for t in TEXTS["alpha"]])
  np.testing.assert_array_equal(flat, want)  # every document, in order, none dropped
  take(p)


def test_plain_text_source(tmp_path):
  for d, texts in TEXTS.items():
    os.makedirs(tmp_path / "corpus" / d)
    for split in ("train", "validation"):
      (tmp_path / "corpus" / d / f"{split}.txt").write_text("\n".join(texts) + "\n\n",
                                                            encoding="utf-8")
  p = pipeline_lib.make_pipeline(make_cfg(tmp_path, source="text"), global_batch_size=4)
  assert p._store("beta", "train").meta["docs"] == len(TEXTS["beta"])  # pylint: disable=protected-access
  take(p)


def test_tfrecord_via_convert_equals_jsonl(corpus, tmp_path):
  out = tmp_path / "tfr"
  for d in TEXTS:
    assert convert_lib.main(["--domain_dir", str(corpus / "corpus" / d), "--out",
                             str(out / d), "--shards", "3"]) == 0
  assert sorted(os.listdir(out / "alpha"))[0] == "train.tfrecord-00000-of-00003"
  assert len(os.listdir(out / "alpha")) == 6
  j = pipeline_lib.make_pipeline(make_cfg(corpus), global_batch_size=4)
  cfg = make_cfg(corpus, source="tfrecord", corpus_dir=str(out))
  t = pipeline_lib.make_pipeline(cfg, global_batch_size=4)
  for d in TEXTS:
    np.testing.assert_array_equal(all_rows(j)[d], all_rows(t)[d])
  for a, b in zip(take(j), take(t)):
    for k in batch_lib.FIELDS:
      np.testing.assert_array_equal(a[k], b[k])


def test_convert_command_line(corpus, tmp_path):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-m", "cpt_jax.data.convert", "--domain_dir",
                      str(corpus / "corpus" / "beta"), "--out", str(tmp_path / "o"), "--shards",
                      "2"], cwd=repo, capture_output=True, text=True, timeout=120, check=True)
  assert sorted(os.listdir(tmp_path / "o")) == [
      f"{s}.tfrecord-0000{k}-of-00002" for s in ("train", "validation") for k in (0, 1)]
  assert "train.tfrecord-00000-of-00002" in r.stdout


def test_real_corpora_if_present(tmp_path):
  corpora = sources_lib.find_corpus_dir("")
  if not os.path.isdir(corpora):
    pytest.skip(f"no corpora at {corpora}")
  doms = sorted(os.listdir(corpora))
  doms = [d for d in doms if os.path.isdir(os.path.join(corpora, d))][:3]
  cfg = make_cfg(tmp_path, corpus_dir=corpora, new=doms[0], replay=",".join(doms[1:]),
                 max_docs=20, seq_len=256)
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  for _ in range(5):
    batch_lib.check_batch(p.next_batch(), 256)
  assert len(list(p.eval_batches(doms[0], 8, max_rows=16))) == 2
  p.close()


def test_tfds_source_with_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  cfg = make_cfg(tmp_path, source="tfds", new="imdb_reviews", replay="",
                 tfds_validation_split="test", max_docs=50)
  with tfds.testing.mock_data(num_examples=20):
    p = pipeline_lib.make_pipeline(cfg, global_batch_size=4)
    b = take(p, 3)[0]
    assert (b["domain_ids"] == 0).all() and p.domains == ["imdb_reviews"]
    assert p._store("imdb_reviews", "train").meta["docs"] == 20  # pylint: disable=protected-access
    assert len(list(p.eval_batches("imdb_reviews", 4))) >= 1


def test_seqio_tasks_match_store_documents(corpus):
  import seqio
  cfg = make_cfg(corpus)
  from cpt_jax.data import tasks as tasks_lib
  names = tasks_lib.register_tasks(cfg)
  assert set(names) == {(d, s) for d in TEXTS for s in sources_lib.SPLITS}
  task = seqio.get_mixture_or_task(names[("alpha", "train")])
  ds = task.get_dataset(sequence_length=None, split="train", shuffle=False, use_cached=False)
  docs = [ex["targets"] for ex in ds.as_numpy_iterator()]
  v = vocab_lib.Vocab("byte")
  flat, lens = v.encode_batch(TEXTS["alpha"])
  want = np.split(flat, np.cumsum(lens)[:-1])
  assert len(docs) == len(want)
  for a, b in zip(docs, want):
    np.testing.assert_array_equal(a, np.append(b, 1))


# -- bad input -------------------------------------------------------------------


def test_missing_domain_folder_names_path(corpus):
  with pytest.raises(sources_lib.DataError, match=r"missing domain folder .*gamma"):
    pipeline_lib.make_pipeline(make_cfg(corpus, replay="beta,gamma"), global_batch_size=4)


def test_missing_split_names_path(corpus):
  os.remove(corpus / "corpus" / "beta" / "train.jsonl")
  with pytest.raises(sources_lib.DataError, match=r"missing split 'train'.*beta.train\.jsonl"):
    pipeline_lib.make_pipeline(make_cfg(corpus), global_batch_size=4)
  # Distill only needs validation: fine without train.
  p = pipeline_lib.make_pipeline(make_cfg(corpus, replay="", distill="beta"), global_batch_size=4)
  take(p)
  os.remove(corpus / "corpus" / "beta" / "validation.jsonl")
  with pytest.raises(sources_lib.DataError, match=r"missing split 'validation'"):
    pipeline_lib.make_pipeline(make_cfg(corpus, replay="", eval="beta"), global_batch_size=4)
  with pytest.raises(sources_lib.DataError, match="does not exist"):
    pipeline_lib.make_pipeline(make_cfg(corpus, corpus_dir=str(corpus / "nope")),
                               global_batch_size=4)


def test_empty_domain(corpus):
  (corpus / "corpus" / "beta" / "train.jsonl").write_text("\n")
  with pytest.raises(sources_lib.DataError, match=r"'beta'.*empty.*beta.train\.jsonl"):
    pipeline_lib.make_pipeline(make_cfg(corpus), global_batch_size=4)


def _corrupt(corpus, line_bytes, at=3):
  path = corpus / "corpus" / "beta" / "train.jsonl"
  lines = path.read_bytes().splitlines(keepends=True)
  lines.insert(at - 1, line_bytes)
  path.write_bytes(b"".join(lines))
  return str(path)


def test_malformed_json_names_file_and_line(corpus):
  path = _corrupt(corpus, b'{"id": "x", "text": "unterminated\n')
  with pytest.raises(sources_lib.DataError, match=rf"{path}:3: malformed JSON"):
    pipeline_lib.make_pipeline(make_cfg(corpus), global_batch_size=4)
  _corrupt(corpus, b'["not", "an", "object"]\n', at=6)
  p = pipeline_lib.make_pipeline(make_cfg(corpus, on_bad_line="skip"), global_batch_size=4)
  assert p.stats()["skipped_lines"]["beta/train"] == 2
  assert p._store("beta", "train").meta["docs"] == len(TEXTS["beta"])  # pylint: disable=protected-access
  take(p)


def test_invalid_utf8_names_file_and_line(corpus):
  path = _corrupt(corpus, b'{"id": "x", "text": "bad \xff\xfe bytes"}\n', at=2)
  with pytest.raises(sources_lib.DataError, match=rf"{path}:2: invalid UTF-8"):
    pipeline_lib.make_pipeline(make_cfg(corpus), global_batch_size=4)
  p = pipeline_lib.make_pipeline(make_cfg(corpus, on_bad_line="skip"), global_batch_size=4)
  assert p.stats()["skipped_lines"]["beta/train"] == 1


def test_lone_surrogate_is_invalid_utf8(corpus):
  path = _corrupt(corpus, b'{"id": "x", "text": "half \\ud800 pair"}\n', at=4)
  with pytest.raises(sources_lib.DataError, match=rf"{path}:4: invalid UTF-8"):
    pipeline_lib.make_pipeline(make_cfg(corpus), global_batch_size=4)


def test_invalid_utf8_in_text_source(tmp_path):
  os.makedirs(tmp_path / "corpus" / "alpha")
  (tmp_path / "corpus" / "alpha" / "train.txt").write_bytes(b"good line\nbad \xc3\x28 line\n")
  (tmp_path / "corpus" / "alpha" / "validation.txt").write_bytes(b"good line\n")  # read too
  with pytest.raises(sources_lib.DataError, match=r"alpha.train\.txt:2: invalid UTF-8"):
    pipeline_lib.make_pipeline(make_cfg(tmp_path, source="text", replay=""), global_batch_size=4)


def test_invalid_weights_name_domain(corpus):
  with pytest.raises(ValueError, match="data.weights: weight of domain 'beta' is negative"):
    pipeline_lib.make_pipeline(make_cfg(corpus, weights="alpha=1,beta=-1"), global_batch_size=4)
  p = pipeline_lib.make_pipeline(make_cfg(corpus), global_batch_size=4)
  for bad, msg in [({"alpha": float("nan")}, "'alpha' is not finite"),
                   ({"alpha": 0.0, "beta": 0.0}, "sum to 0"),
                   ({"gamma": 1.0}, "unknown domain 'gamma'"),
                   (np.array([1.0, -2.0]), "'beta' is negative")]:
    with pytest.raises(ValueError, match=msg):
      p.set_weights(bad)
  np.testing.assert_array_equal(p.weights > 0, [True, True])  # unchanged
