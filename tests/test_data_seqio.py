"""Registered seqio Tasks and a Mixture as a run's domains, packed by the store builder."""

import numpy as np
import pytest

from cpt_jax import config as run_config
from cpt_jax import stages
from cpt_jax.data import packing
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.schema import data as config_lib

seqio = pytest.importorskip("seqio")

LINES = {
    "news": ["stocks rose today", "rain expected later", "a long story " * 9],
    "code": ["def f(): pass", "x = 1 + 2", "print('hi')", "for i in range(3): i"],
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  """Tasks test_seqio.news / test_seqio.code from local text files, and a Mixture of both."""
  root = tmp_path_factory.mktemp("seqio")
  vocab = seqio.ByteVocabulary()
  for name, lines in LINES.items():
    files = {}
    for split in ("train", "validation"):
      path = root / f"{name}.{split}.txt"
      path.write_text("\n".join(lines) + "\n")
      files[split] = str(path)
    task = f"test_seqio.{name}"
    seqio.TaskRegistry.remove(task)
    seqio.TaskRegistry.add(
        task, source=seqio.TextLineDataSource(files),
        preprocessors=[lambda ds: ds.map(lambda t: {"targets": t}),
                       seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={"targets": seqio.Feature(vocab, add_eos=True)})
  seqio.MixtureRegistry.remove("test_seqio_mix")
  seqio.MixtureRegistry.add("test_seqio_mix", [("test_seqio.news", 3.0), ("test_seqio.code", 1.0)])
  return root


def _cfg(tmp_path, **kw):
  cfg = config_lib.default_data_config()
  cfg.update(cache_dir=str(tmp_path / "cache"), seq_len=16, prefetch=0, shard_rows=2, **kw)
  return cfg


def _want_rows(name):
  docs = [np.append(np.frombuffer(t.encode(), np.uint8).astype(np.int32) + 3, 1)
          for t in LINES[name]]
  return packing.pack_flat(np.concatenate(docs), [d.size for d in docs], 16)


def test_tasks_by_regex_are_domains_packed_like_text(registered, tmp_path):
  cfg = _cfg(tmp_path, corpus_dir=str(tmp_path / "no_corpus"), seqio_tasks=r"test_seqio\..*",
             new="test_seqio.news", replay="test_seqio.c*")
  with pytest.raises(Exception, match="no_corpus"):  # an explicit corpus_dir must exist
    pipeline_lib.make_pipeline(cfg, global_batch_size=4)
  cfg.corpus_dir = ""
  p = pipeline_lib.make_pipeline(cfg, global_batch_size=4)
  assert p.domains == ["test_seqio.code", "test_seqio.news"] and p.roles == ["replay", "new"]
  for name in LINES:
    st = p._store(f"test_seqio.{name}", "train")  # pylint: disable=protected-access
    np.testing.assert_array_equal(st.rows_3xRxL, _want_rows(name))
    assert st.meta["docs"] == len(LINES[name])
  assert p.next_batch()["targets"].shape == (4, 16)
  p.close()


def test_mixture_names_domains_and_initial_weights(registered, tmp_path):
  p = pipeline_lib.make_pipeline(_cfg(tmp_path, seqio_mixture="test_seqio_mix"),
                                 global_batch_size=4)
  assert p.domains == ["test_seqio.code", "test_seqio.news"] and p.roles == ["new", "new"]
  np.testing.assert_allclose(p.weights, [1.0, 3.0])
  p.set_weights({"test_seqio.code": 2.0})  # what a rate controller does
  np.testing.assert_allclose(p.weights, [2.0, 3.0])
  p.close()
  q = pipeline_lib.make_pipeline(_cfg(tmp_path, seqio_mixture="test_seqio_mix",
                                      weights="test_seqio.news=0.5"), global_batch_size=4)
  np.testing.assert_allclose(q.weights, [1.0, 0.5])  # data.weights overrides the rate
  q.close()


def test_bad_seqio_settings_name_the_key(registered, tmp_path):
  with pytest.raises(ValueError, match="data.seqio_tasks"):
    pipeline_lib.make_pipeline(_cfg(tmp_path, seqio_tasks="nope.*", new="x"),
                               global_batch_size=4)
  with pytest.raises(ValueError, match="data.seqio_mixture"):
    pipeline_lib.make_pipeline(_cfg(tmp_path, seqio_mixture="nope"), global_batch_size=4)


def test_staged_runs_see_a_mixtures_tasks(registered, tmp_path):
  """The all-domain evaluation of a staged run lists the Tasks a Mixture names."""
  c = run_config.default_config()
  c.data.update(_cfg(tmp_path, seqio_mixture="test_seqio_mix"))
  c.stages.pretrain = {"data": {"weights": "test_seqio.news=1"}}
  c.stage_order = "pretrain"
  assert stages.run_domains(c) == ["test_seqio.code", "test_seqio.news"]
