"""benchmarks/input_pipeline.py's gcs row: stores written to the emulator's bucket, read back."""

import pytest

import input_pipeline  # benchmarks/ is on sys.path (conftest)
from tests import gcs_server
from tests.helpers import write_corpus


def test_gcs_row_reads_the_same_batches_from_the_bucket(tmp_path):
  if gcs_server.missing():
    pytest.skip(f"{', '.join(gcs_server.missing())} not installed: no local GCS server")
  domains = ["alpha", "beta", "gamma"]
  corpus = str(write_corpus(tmp_path / "corpus", domains=domains, docs=60))
  cfg = input_pipeline.byte_config(corpus, domains, 32, 2, str(tmp_path / "cache"))
  local = input_pipeline.measure(cfg, 4, 3, warmup=3)
  gcs = input_pipeline.measure_gcs(cfg, 4, 3, str(tmp_path))
  assert gcs["cache_dir"] == "gs://cpt-bench/cache"
  assert gcs["objects"] == 3 * len(domains)  # index.json and one shard of rows + token counts each
  assert gcs["tokens_per_sec_prefetch"] > 0 and gcs["tokens_per_sec_sync"] > 0
  # The same rows in the same order: the padding of the timed batches matches the local run's.
  assert gcs["padding_fraction"] == local["padding_fraction"]
