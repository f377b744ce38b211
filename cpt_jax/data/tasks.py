"""seqio Tasks and Mixtures as a run's domains, and a run's corpus as seqio Tasks.

Registered Tasks as domains: `data.seqio_tasks` (names or regexes) makes every
matching registered Task a domain named after it, and `data.seqio_mixture`
makes a registered Mixture's Tasks domains (role 'new' unless a role field
names them) with the Mixture's rates as initial weights. A Task's tokenised
`targets` (in its own order, unshuffled, as its preprocessors leave them: EOS
included when its feature adds one) are packed into a store by the same
streaming builder as text (store.py: a Source of kind 'seqio'). Its targets
vocabulary must be the run's (data.vocab). Registration happens in the user's
code (a module the config imports), before the run starts.

`register_tasks` goes the other way: one Task per (domain, split) of the run's
corpus, tokenised like the store (its token streams equal the documents the
store packs; tested), so seqio tooling (caching, evaluation) sees the same data.
Imports seqio/TensorFlow only when used.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterator

import numpy as np

from cpt_jax import tensorflow_cpu
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
  tf = tensorflow_cpu.tensorflow()
  import seqio  # pylint: disable=g-import-not-at-top
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


SEQIO = "seqio"  # Source.kind of a registered seqio Task


def _seqio():
  tensorflow_cpu.tensorflow()
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio


def seqio_domains(cfg) -> tuple[list[str], list[str]]:
  """(Task names of data.seqio_tasks, Task names of data.seqio_mixture), each sorted;
  ValueError naming the key when a pattern matches no registered Task or the Mixture
  is not registered."""
  tasks: list[str] = []
  pats = config_lib.split_list(cfg.get("seqio_tasks", ""))
  mixture = cfg.get("seqio_mixture", "")
  if not pats and not mixture:
    return [], []
  seqio = _seqio()
  names = sorted(seqio.TaskRegistry.names())
  for pat in pats:
    try:
      rx = re.compile(pat)
    except re.error as e:
      raise ValueError(f"data.seqio_tasks: {pat!r} is not a regex ({e})") from None
    hits = [n for n in names if rx.fullmatch(n)]
    if not hits:
      raise ValueError(f"data.seqio_tasks: {pat!r} matches no registered seqio Task "
                       f"({len(names)} registered)")
    tasks += [n for n in hits if n not in tasks]
  mix: list[str] = []
  if mixture:
    if mixture not in seqio.MixtureRegistry.names():
      raise ValueError(f"data.seqio_mixture: no registered seqio Mixture {mixture!r}")
    mix = sorted(t.name for t in seqio.get_mixture_or_task(mixture).tasks)
  return sorted(tasks), mix


def mixture_weights(cfg) -> str:
  """data.weights followed by data.seqio_mixture's rates ('task=rate') of the Tasks no
  data.weights item matches: the run's initial weights spec."""
  if not cfg.get("seqio_mixture", ""):
    return cfg.weights
  items = config_lib.parse_weights(cfg.weights)
  mixture = _seqio().get_mixture_or_task(cfg.seqio_mixture)
  rates = [f"{t.name}={float(mixture.get_rate(t))!r}"
           for t in sorted(mixture.tasks, key=lambda t: t.name)
           if not any(k == t.name or (config_lib.is_pattern(k) and fnmatch.fnmatchcase(t.name, k))
                      for k, _ in items)]
  return ",".join(filter(None, [cfg.weights] + rates))


def _vocab_key(vocabulary) -> str:
  """A seqio vocabulary's `Vocab.key` (byte or SentencePiece), else its class name."""
  seqio = _seqio()
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return "byte"
  path = getattr(vocabulary, "sentencepiece_model_file", None)
  if isinstance(vocabulary, seqio.SentencePieceVocabulary) and path:
    return vocab_lib.Vocab(path).key
  return type(vocabulary).__name__


def seqio_source(task_name: str, split: str, vocab_key: str) -> sources_lib.Source:
  """The Source of a registered Task's split; DataError when it lacks the split or its
  targets vocabulary is not the run's."""
  task = _seqio().get_mixture_or_task(task_name)
  if split not in task.splits:
    raise sources_lib.DataError(f"seqio Task {task_name!r}: no split {split!r} "
                                f"(has {sorted(task.splits)})")
  feat = task.output_features.get("targets")
  if feat is None:
    raise sources_lib.DataError(f"seqio Task {task_name!r}: no 'targets' feature")
  got = _vocab_key(feat.vocabulary)
  if got != vocab_key:
    raise sources_lib.DataError(f"seqio Task {task_name!r}: targets vocabulary {got} is not "
                                f"the run's data.vocab ({vocab_key})")
  return sources_lib.Source(SEQIO, task_name, split, text_feature="targets")


def seqio_documents(src: sources_lib.Source, max_docs: int = 0
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The Task's tokenised targets of src.split, in order, as (flat_T, lengths_O) chunks."""
  task = _seqio().get_mixture_or_task(src.domain)
  ds = task.get_dataset(sequence_length=None, split=src.split, shuffle=False, num_epochs=1,
                        trim_output_features=False)
  docs: list[np.ndarray] = []
  n = 0
  for ex in ds.as_numpy_iterator():
    docs.append(np.asarray(ex["targets"], np.int32).reshape(-1))
    n += 1
    if len(docs) >= 512 or (max_docs and n >= max_docs):
      yield np.concatenate(docs), np.array([d.size for d in docs], np.int64)
      docs = []
    if max_docs and n >= max_docs:
      return
  if docs:
    yield np.concatenate(docs), np.array([d.size for d in docs], np.int64)
