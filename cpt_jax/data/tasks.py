"""seqio Tasks: one per (domain, split) of a run's corpus.

Each Task reads the same documents as the packed-row store (same source
reader, same bad-line policy), tokenises with the run's vocabulary and appends
EOS; its token streams equal the documents the store packs (tested). The
training path reads the stores, not these Tasks; the Tasks let seqio tooling
(caching, mixtures, evaluation) see the same data. Imports seqio/TensorFlow.
"""

from __future__ import annotations

import re

from cpt_jax.schema import data as config_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.data import vocab as vocab_lib


def task_name(domain: str, split: str, prefix: str = "cpt") -> str:
  """A seqio-valid task name for (domain, split)."""
  safe = re.sub(r"[^\w.:]", "_", domain)
  return f"{prefix}.{safe}.{split}"


def register_tasks(cfg, splits=sources_lib.SPLITS, prefix: str = "cpt") -> dict:
  """Registers (replacing) one seqio Task per domain of the run and split present.

  Returns:
    {(domain, split): task name}. A Task's only source split is `split`.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  corpus_dir = sources_lib.find_corpus_dir(cfg.corpus_dir) if cfg.source != "tfds" else ""
  role_of = config_lib.resolve_roles(cfg, sources_lib.list_domains(corpus_dir, cfg.source))
  vocab = vocab_lib.make_vocab(cfg.vocab).seqio_vocabulary()
  out = {}
  for domain in sorted(role_of):
    for split in splits:
      try:
        src = sources_lib.make_source(cfg, corpus_dir, domain, split)
      except sources_lib.DataError:
        continue

      def dataset_fn(split, shuffle_files, seed=None, _src=src):  # pylint: disable=unused-argument
        gen = lambda: sources_lib.read_texts(_src, cfg.on_bad_line, cfg.max_docs)
        return tf.data.Dataset.from_generator(
            gen, output_signature=tf.TensorSpec((), tf.string)).map(lambda t: {"text": t})

      name = task_name(domain, split, prefix)
      seqio.TaskRegistry.remove(name)
      seqio.TaskRegistry.add(
          name,
          source=seqio.FunctionDataSource(dataset_fn, splits=[split]),
          preprocessors=[
              lambda ds: ds.map(lambda x: {"targets": x["text"]}),
              seqio.preprocessors.tokenize,
              seqio.preprocessors.append_eos,
          ],
          output_features={"targets": seqio.Feature(vocab, add_eos=cfg.append_eos)},
      )
      out[(domain, split)] = name
  return out
