"""The stdlib corpus: format, determinism, distinct domains, usable by the pipeline."""

import json
import os

from cpt_jax import batch as batch_lib
from cpt_jax.data import builtin_corpus
from cpt_jax.schema import data as config_lib
from cpt_jax.data import pipeline as pipeline_lib

DOMAINS = ["py_code", "py_docstrings", "py_help", "py_tests"]


def test_stdlib_corpus(tmp_path):
  a = builtin_corpus.write_stdlib_corpus(str(tmp_path / "a"), max_docs_per_domain=40,
                                         max_bytes_per_domain=120_000)
  b = builtin_corpus.write_stdlib_corpus(str(tmp_path / "b"), max_docs_per_domain=40,
                                         max_bytes_per_domain=120_000)
  assert sorted(os.listdir(a)) == DOMAINS
  texts = {}
  for d in DOMAINS:
    for split in ("train", "validation"):
      raw = open(os.path.join(a, d, f"{split}.jsonl"), "rb").read()
      assert raw == open(os.path.join(b, d, f"{split}.jsonl"), "rb").read()  # deterministic
      recs = [json.loads(l) for l in raw.decode("utf-8").splitlines()]
      assert recs and all(set(r) == {"id", "text"} and r["text"] for r in recs)
      assert [r["id"] for r in recs] == sorted(r["id"] for r in recs)
      texts[d, split] = {r["text"] for r in recs}
    assert 5 <= len(texts[d, "validation"]) and not texts[d, "train"] & texts[d, "validation"]
    assert sum(map(len, texts[d, "train"])) <= 120_000 + 20_000
  for d in DOMAINS:  # domains are distinct
    for e in DOMAINS:
      if d < e:
        assert not texts[d, "train"] & texts[e, "train"]
  assert not [f for f in os.listdir(os.path.join(a, "py_code")) if f.startswith(".tmp")]

  cfg = config_lib.default_data_config()
  cfg.corpus_dir, cfg.cache_dir, cfg.seq_len = a, str(tmp_path / "cache"), 128
  cfg.new, cfg.replay, cfg.eval = "py_help", "py_code,py_docstrings", "py_tests"
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=8)
  batch_lib.check_batch(p.next_batch(), 128)
  p.close()
