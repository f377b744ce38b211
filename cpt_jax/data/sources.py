"""Document sources: JSONL, plain text, TFRecord and TFDS, with bad-input checks.

A source yields the texts of one (domain, split) in a fixed order. TensorFlow
is imported only by the TFRecord and TFDS readers. A corpus folder may be a bucket
(gs://...): JSONL and text files are read through `paths` (etils.epath); TFRecord and TFDS
files are read by TensorFlow, which has its own GCS client.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from typing import Iterator

from cpt_jax import paths
from cpt_jax import tensorflow_cpu
from cpt_jax.data import builtin_corpus

SPLITS = ("train", "validation")


class DataError(ValueError):
  """Bad or missing input data; the message names the file (and line)."""


@dataclasses.dataclass
class ReadStats:
  """Counts of one read: documents kept and lines skipped (on_bad_line='skip')."""
  docs: int = 0
  skipped: int = 0
  first_skip: str = ""


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one (domain, split) lives and how to read it."""
  kind: str  # jsonl | text | tfrecord | tfds
  domain: str
  split: str
  files: tuple[str, ...] = ()
  text_feature: str = "text"
  tfds_name: str = ""
  tfds_split: str = ""
  tfds_data_dir: str = ""

  def fingerprint(self) -> list:
    """What the cache key depends on: files with size and mtime, or the TFDS name."""
    if self.kind == "tfds":
      return [self.kind, self.tfds_name, self.tfds_split, self.tfds_data_dir, self.text_feature]
    out = [self.kind, self.text_feature]
    for f in self.files:
      if paths.is_remote(f):
        st = paths.as_path(f).stat()
        out.append([f, st.length, st.mtime])
      else:
        st = os.stat(f)
        out.append([paths.absolute(f), st.st_size, st.st_mtime_ns])
    return out


_EXT = {"jsonl": ".jsonl", "text": ".txt", "tfrecord": ".tfrecord"}


def list_domains(corpus_dir: str, kind: str) -> list[str] | None:
  """Sorted domain folders of a corpus (None for tfds, which cannot list)."""
  if kind == "tfds":
    return None
  root = paths.as_path(corpus_dir)
  if not root.is_dir():
    raise DataError(f"corpus directory {corpus_dir!r} does not exist")
  ext = _EXT[kind]
  return sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob(f"*{ext}*")))


def make_source(cfg, corpus_dir: str, domain: str, split: str) -> Source:
  """Finds the files of (domain, split); raises DataError naming the missing path."""
  if cfg.source == "tfds":
    tsplit = cfg.tfds_train_split if split == "train" else cfg.tfds_validation_split
    return Source("tfds", domain, split, text_feature=cfg.text_feature, tfds_name=domain,
                  tfds_split=tsplit, tfds_data_dir=cfg.tfds_data_dir)
  ddir = os.path.join(corpus_dir, domain)
  if not paths.as_path(ddir).is_dir():
    raise DataError(f"domain {domain!r}: missing domain folder {ddir}")
  if cfg.source == "tfrecord":
    files = sorted(os.path.join(ddir, f.name)
                   for f in paths.as_path(ddir).glob(f"{split}.tfrecord*"))
    if not files:
      raise DataError(f"domain {domain!r}: missing split {split!r}: no {ddir}/{split}.tfrecord*")
    return Source("tfrecord", domain, split, tuple(files), text_feature=cfg.text_feature)
  path = os.path.join(ddir, split + _EXT[cfg.source])
  if not paths.as_path(path).is_file():
    raise DataError(f"domain {domain!r}: missing split {split!r}: no file {path}")
  return Source(cfg.source, domain, split, (path,))


def check_readable(src: Source) -> None:
  """Opens each file of `src` and reads its first byte; DataError naming an unreadable one
  (no permission, a folder, an I/O error) or an empty one."""
  for path in src.files:
    try:
      with paths.as_path(path).open("rb") as f:
        first = f.read(1)
    except OSError as e:
      raise DataError(f"domain {src.domain!r}: split {src.split!r}: cannot read {path}: "
                      f"{e.strerror or e}") from None
    if not first:
      raise DataError(f"domain {src.domain!r}: split {src.split!r}: {path} is empty")


def read_texts(src: Source, on_bad_line: str = "error", max_docs: int = 0,
               stats: ReadStats | None = None) -> Iterator[str]:
  """Yields the documents of `src` in file order; bad lines raise or are counted."""
  stats = stats if stats is not None else ReadStats()
  reader = {"jsonl": _read_jsonl, "text": _read_text, "tfrecord": _read_tfrecord,
            "tfds": _read_tfds}[src.kind]
  for text in reader(src, on_bad_line, stats):
    yield text
    stats.docs += 1
    if max_docs and stats.docs >= max_docs:
      return


def _bad(stats: ReadStats, on_bad_line: str, where: str, msg: str) -> None:
  if on_bad_line != "skip":
    raise DataError(f"{where}: {msg}")
  stats.skipped += 1
  stats.first_skip = stats.first_skip or f"{where}: {msg}"


def _check_text(text, where, stats, on_bad_line) -> bool:
  """True when text encodes as UTF-8 (no lone surrogates)."""
  try:
    text.encode("utf-8")
    return True
  except UnicodeEncodeError as e:
    _bad(stats, on_bad_line, where, f"invalid UTF-8 in text ({e.reason} at {e.start})")
    return False


def _read_jsonl(src: Source, on_bad_line: str, stats: ReadStats) -> Iterator[str]:
  for path in src.files:
    with paths.as_path(path).open("rb") as f:
      for lineno, raw in enumerate(f, 1):
        where = f"{path}:{lineno}"
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          _bad(stats, on_bad_line, where, f"invalid UTF-8 (byte {e.start})")
          continue
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          _bad(stats, on_bad_line, where, f"malformed JSON ({e.msg}, column {e.colno})")
          continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
          _bad(stats, on_bad_line, where, 'malformed record: expected {"id", "text": str}')
          continue
        if _check_text(obj["text"], where, stats, on_bad_line):
          yield obj["text"]


def _read_text(src: Source, on_bad_line: str, stats: ReadStats) -> Iterator[str]:
  for path in src.files:
    with paths.as_path(path).open("rb") as f:
      for lineno, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          _bad(stats, on_bad_line, f"{path}:{lineno}", f"invalid UTF-8 (byte {e.start})")
          continue
        line = line.rstrip("\r\n")
        if line.strip():
          yield line


def _decode(value: bytes, where: str, stats: ReadStats, on_bad_line: str) -> str | None:
  try:
    return value.decode("utf-8")
  except UnicodeDecodeError as e:
    _bad(stats, on_bad_line, where, f"invalid UTF-8 (byte {e.start})")
    return None


def _read_tfrecord(src: Source, on_bad_line: str, stats: ReadStats) -> Iterator[str]:
  tf = tensorflow_cpu.tensorflow()
  for path in src.files:
    for i, rec in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
      where = f"{path}:record {i}"
      ex = tf.train.Example.FromString(rec)
      feat = ex.features.feature.get(src.text_feature)
      if feat is None or not feat.bytes_list.value:
        _bad(stats, on_bad_line, where, f"no bytes feature {src.text_feature!r}")
        continue
      text = _decode(feat.bytes_list.value[0], where, stats, on_bad_line)
      if text is not None and text.strip():
        yield text


def _read_tfds(src: Source, on_bad_line: str, stats: ReadStats) -> Iterator[str]:
  tensorflow_cpu.tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = tfds.load(src.tfds_name, split=src.tfds_split, data_dir=src.tfds_data_dir or None,
                 shuffle_files=False)
  for i, ex in enumerate(tfds.as_numpy(ds)):
    where = f"tfds:{src.tfds_name}/{src.tfds_split}:example {i}"
    if src.text_feature not in ex:
      raise DataError(f"{where}: no feature {src.text_feature!r}; has {sorted(ex)}")
    value = ex[src.text_feature]
    text = value if isinstance(value, str) else _decode(bytes(value), where, stats, on_bad_line)
    if text is not None and text.strip():
      yield text


BUILTIN_STDLIB = "builtin:stdlib"


def find_corpus_dir(corpus_dir: str = "") -> str:
  """corpus_dir, else $CPT_CORPORA, else <repo>/../shared/corpora.

  'builtin:stdlib' builds (once, cached by Python version) the corpus of
  `builtin_corpus.write_stdlib_corpus` and returns its folder.
  """
  if corpus_dir == BUILTIN_STDLIB:
    tag = "py%d.%d.%d" % sys.version_info[:3]
    out = os.path.join(os.environ.get("CPT_BUILTIN_CORPUS_DIR", tempfile.gettempdir()),
                       f"cpt_jax_stdlib_corpus_{tag}")
    if not os.path.isfile(os.path.join(out, "py_tests", "validation.jsonl")):
      builtin_corpus.write_stdlib_corpus(out)
    return out
  if corpus_dir:
    return corpus_dir
  if os.environ.get("CPT_CORPORA"):
    return os.environ["CPT_CORPORA"]
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(os.path.dirname(repo), "shared", "corpora")
