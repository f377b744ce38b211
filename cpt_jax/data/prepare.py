"""A Hugging Face `datasets` or TFDS dataset -> one domain of a corpus folder.

  python -m cpt_jax.data.prepare --hf PATH_OR_NAME --domain D --out CORPUS
  python -m cpt_jax.data.prepare --tfds NAME --data_dir DIR --domain D --out CORPUS

`--hf` takes a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, data
files (`.jsonl` / `.json`, `.parquet`, `.csv`, `.txt`; a glob or a folder of them), or a
dataset name on the Hugging Face Hub (when the Hub is reachable); it needs the `prepare`
extra (`pip install 'cpt_jax[prepare]'`). `--tfds` reads a TFDS dataset already built in
`--data_dir` (`tfds build NAME --data_dir DIR`); nothing is downloaded.

Writes <out>/<domain>/train.jsonl and validation.jsonl, one {"id", "text"} per line (the
layout `data.corpus_dir` reads), and prepare.json (source, options, counts). Documents
stream through one at a time: memory does not grow with the dataset. A document goes to
validation when the first 8 bytes of sha256(salt + its text) fall below
`--validation_fraction`: deterministic, independent of order and cap, and exact duplicates
never straddle the split. `--validation_split` takes validation from a split of the source
instead. Empty documents are skipped and counted. The domain is written into a hidden
folder under <out> and renamed into place when complete, so a failed or killed prepare
leaves no partial domain behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Iterable, Iterator

from cpt_jax import tensorflow_cpu
from cpt_jax.data import sources as sources_lib

SPLIT_SALT = b"cpt-jax-prepare-v1:"
_DOMAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Data-file extensions -> the `datasets` packaged builder that reads them.
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
                  ".txt": "text"}
_HF_INSTALL = "pip install 'cpt_jax[prepare]' (Hugging Face datasets)"


class PrepareError(sources_lib.DataError):
  """Bad arguments or source records; the message names the argument (and record)."""


@dataclasses.dataclass(frozen=True)
class Options:
  """What to read and where to write (the command line's arguments)."""
  out: str
  domain: str
  hf: str = ""  # save_to_disk folder, data files (glob / folder) or Hub name
  hf_config: str = ""  # the Hub dataset's configuration name
  tfds: str = ""  # a TFDS dataset name, built in data_dir
  data_dir: str = ""  # TFDS data_dir
  split: str = "train"  # the source split read
  validation_split: str = ""  # a source split for validation.jsonl instead of the fraction
  validation_fraction: float = 0.05  # share of documents hashed into validation
  max_docs: int = 0  # at most this many documents read per source split (0: all)
  text_field: str = "text"  # the field holding the document
  id_field: str = ""  # the field holding its id ('' = "<split>:<index>")
  text_by: str = "line"  # .txt files: one document per line | paragraph | document
  overwrite: bool = False  # replace an existing <out>/<domain>


@dataclasses.dataclass
class Counts:
  train: int = 0
  validation: int = 0
  skipped_empty: int = 0
  read: dict = dataclasses.field(default_factory=dict)  # source split -> documents read


def check_options(o: Options) -> None:
  """PrepareError naming the argument, before anything is read."""
  if bool(o.hf) == bool(o.tfds):
    raise PrepareError("give exactly one source: --hf PATH_OR_NAME or --tfds NAME")
  if not _DOMAIN.fullmatch(o.domain or ""):
    raise PrepareError(f"--domain {o.domain!r}: a domain is a folder name of letters, digits, "
                       "'_', '.', '-' (not starting with '.' or '-')")
  if not o.out:
    raise PrepareError("--out: the corpus folder to write into is required")
  if os.path.exists(o.out) and not os.path.isdir(o.out):
    raise PrepareError(f"--out {o.out!r} exists and is not a folder")
  if os.path.exists(os.path.join(o.out, o.domain)) and not o.overwrite:
    raise PrepareError(f"--out/--domain: {os.path.join(o.out, o.domain)} exists; pass "
                       "--overwrite to replace it")
  if o.validation_split:
    if o.validation_split == o.split:
      raise PrepareError(f"--validation_split {o.validation_split!r} is --split itself")
  elif not 0 < o.validation_fraction < 1:
    raise PrepareError(f"--validation_fraction {o.validation_fraction}: must be in (0, 1), "
                       "or give --validation_split")
  if o.max_docs < 0:
    raise PrepareError(f"--max_docs {o.max_docs}: must be >= 0 (0 = every document)")
  if not o.text_field:
    raise PrepareError("--text_field: the name of the text field is required")
  if o.text_by not in ("line", "paragraph", "document"):
    raise PrepareError(f"--text_by {o.text_by!r}: one of line, paragraph, document")
  if o.tfds:
    if o.hf_config:
      raise PrepareError("--hf_config goes with --hf, not --tfds")
    if not o.data_dir or not os.path.isdir(o.data_dir):
      raise PrepareError(f"--data_dir {o.data_dir!r}: the TFDS data_dir holding the built "
                         f"dataset {o.tfds!r} must be an existing folder")
  elif o.data_dir:
    raise PrepareError("--data_dir goes with --tfds; for --hf pass the folder or files itself")


def in_validation(text: str, fraction: float) -> bool:
  """Whether a document goes to validation: its salted text hash, as a number in [0, 1)."""
  digest = hashlib.sha256(SPLIT_SALT + text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _field(record: dict, name: str, arg: str, where: str) -> Any:
  if name not in record:
    raise PrepareError(f"{where}: no field {name!r} ({arg}); the records have "
                       f"{sorted(record)}")
  return record[name]


def _text(value: Any, arg: str, where: str) -> str:
  if isinstance(value, bytes):  # TFDS Text features come as bytes
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise PrepareError(f"{where}: invalid UTF-8 in {arg} (byte {e.start})") from None
  if not isinstance(value, str):
    raise PrepareError(f"{where}: {arg} holds {type(value).__name__}, not text; name a text "
                       "field with --text_field")
  return value


def documents(records: Iterable[dict], o: Options, split: str, where: str,
              counts: Counts) -> Iterator[tuple[str, str]]:
  """(id, text) of the records of one source split, capped at max_docs; empties skipped."""
  n = 0
  for i, record in enumerate(_reading(records, where)):
    if o.max_docs and n >= o.max_docs:
      break
    at = f"{where} record {i}"
    text = _text(_field(record, o.text_field, "--text_field", at), "--text_field", at)
    if not text.strip():
      counts.skipped_empty += 1
      continue
    if o.id_field:
      raw = _field(record, o.id_field, "--id_field", at)
      doc_id = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    else:
      doc_id = f"{split}:{i}"
    n += 1
    yield doc_id, text
  counts.read[split] = n


def _reading(records: Iterable[dict], where: str) -> Iterator[dict]:
  """The records, with a failure of the reader itself (a malformed file) named."""
  it, i = iter(records), 0
  while True:
    try:
      record = next(it)
    except StopIteration:
      return
    except Exception as e:  # pylint: disable=broad-except  (whatever the reader raises)
      raise PrepareError(f"{where}: reading record {i} failed: {type(e).__name__}: "
                         f"{str(e)[:500]}") from None
    yield record
    i += 1


# ---------------------------------------------------------------- sources


def _hf_records(o: Options, split: str) -> tuple[Iterable[dict], str]:
  """The records of one split of the --hf source, streamed; (records, description)."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise PrepareError(f"--hf needs the datasets package: {_HF_INSTALL}") from None
  fields = [f for f in (o.text_field, o.id_field) if f]
  path = os.path.expanduser(o.hf)
  if os.path.isdir(path) and _saved_to_disk(path):
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
      if split not in ds:
        raise PrepareError(f"--hf {o.hf!r} has splits {sorted(ds)}, not {split!r} "
                           "(--split / --validation_split)")
      ds = ds[split]
    elif split != o.split:
      raise PrepareError(f"--validation_split: --hf {o.hf!r} is a single dataset without "
                         "splits; use --validation_fraction")
    _check_columns(ds.column_names, fields, o.hf)
    return ds.select_columns(fields).to_iterable_dataset(), f"{o.hf} ({split})"
  files = sorted(glob.glob(path)) if glob.has_magic(path) else (
      [path] if os.path.isfile(path) else [])
  kwargs = {"split": split, "streaming": True}
  if files and split != o.split:
    raise PrepareError(f"--validation_split: --hf {o.hf!r} names data files, which have no "
                       "splits; use --validation_fraction (or a folder with train / "
                       "validation files)")
  if files:
    kinds = {_FILE_BUILDERS.get(_ext(f)) for f in files}
    if None in kinds or len(kinds) != 1:
      raise PrepareError(f"--hf {o.hf!r}: data files must share one of the extensions "
                         f"{sorted(_FILE_BUILDERS)}; got {sorted({_ext(f) for f in files})}")
    builder = kinds.pop()
    if builder == "text":
      kwargs["sample_by"] = o.text_by
    ds = _load(datasets, o, builder, data_files={split: files}, **kwargs)
  elif glob.has_magic(path):
    raise PrepareError(f"--hf {o.hf!r}: no file matches")
  elif os.path.isdir(path):
    ds = _load(datasets, o, path, **kwargs)
  elif os.path.isabs(path) or path.startswith("."):
    raise PrepareError(f"--hf {o.hf!r}: no such file or folder")
  else:
    ds = _load(datasets, o, o.hf, name=o.hf_config or None, **kwargs)
  if ds.column_names is not None:
    _check_columns(ds.column_names, fields, o.hf)
  return ds, f"{o.hf} ({split})"


def _ext(path: str) -> str:
  return os.path.splitext(path)[1].lower()


def _saved_to_disk(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, f))
             for f in ("dataset_dict.json", "state.json"))


def _check_columns(columns, fields, source) -> None:
  for f, arg in zip(fields, ("--text_field", "--id_field")):
    if f not in columns:
      raise PrepareError(f"{arg} {f!r}: --hf {source!r} has no such field; it has "
                         f"{sorted(columns)}")


def _load(datasets, o: Options, path: str, **kwargs):
  try:
    return datasets.load_dataset(path, **kwargs)
  except ValueError as e:  # an unknown split among them
    if "split" in str(e).lower():
      raise PrepareError(f"--split / --validation_split: --hf {o.hf!r}: {e}") from None
    raise
  except (ConnectionError, OSError, FileNotFoundError) as e:
    where = ("a local folder or file" if os.path.exists(os.path.expanduser(o.hf)) else
             "the Hugging Face Hub (it is not a local folder or file)")
    raise PrepareError(
        f"--hf {o.hf!r}: could not be loaded from {where}: {e}. Without network access, "
        "run `Dataset.save_to_disk` (or download the data files) where the Hub is reachable "
        "and pass that folder") from None


def _tfds_records(o: Options, split: str) -> tuple[Iterable[dict], str]:
  """The examples of one split of a TFDS dataset built in data_dir, as numpy dicts."""
  tensorflow_cpu.tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(o.tfds, data_dir=o.data_dir)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises several kinds)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise PrepareError(f"--tfds {o.tfds!r}: not found in --data_dir {o.data_dir!r} "
                       f"({type(e).__name__}: {first}); build it first with "
                       f"`tfds build {o.tfds} --data_dir {o.data_dir}`") from None
  if not builder.is_prepared():
    raise PrepareError(f"--tfds {o.tfds!r} is not built in --data_dir {o.data_dir!r}: run "
                       f"`tfds build {o.tfds} --data_dir {o.data_dir}` first")
  if split not in builder.info.splits:
    raise PrepareError(f"--split / --validation_split {split!r}: --tfds {o.tfds!r} has splits "
                       f"{sorted(builder.info.splits)}")
  features = list(builder.info.features.keys())
  _check_columns(features, [f for f in (o.text_field, o.id_field) if f], o.tfds)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return tfds.as_numpy(ds), f"tfds:{o.tfds}/{split}"


def records(o: Options, split: str) -> tuple[Iterable[dict], str]:
  """The streamed records of one source split and a description for messages."""
  return _hf_records(o, split) if o.hf else _tfds_records(o, split)


# ---------------------------------------------------------------- writing


def write_domain(o: Options, docs: Iterable[tuple[str, str, str]], meta: dict) -> str:
  """Writes (split, id, text) triples as <out>/<domain>; returns its folder.

  Everything goes to a hidden folder under <out> first (files there are no domain of the
  corpus), renamed to <out>/<domain> when complete; on an error nothing is left behind.
  """
  os.makedirs(o.out, exist_ok=True)
  final = os.path.join(o.out, o.domain)
  tmp_root = tempfile.mkdtemp(prefix=f".prepare-{o.domain}.", dir=o.out)
  try:
    folder = os.path.join(tmp_root, o.domain)
    os.mkdir(folder)
    files = {s: open(os.path.join(folder, f"{s}.jsonl"), "w", encoding="utf-8")
             for s in sources_lib.SPLITS}
    with files["train"], files["validation"]:
      for split, doc_id, text in docs:
        try:
          line = json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n"
          files[split].write(line)
        except UnicodeEncodeError as e:
          raise PrepareError(f"document {doc_id!r}: text is not valid Unicode ({e.reason})") \
              from None
      for f in files.values():
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(folder, "prepare.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    if os.path.exists(final):  # --overwrite, checked before reading
      os.rename(final, os.path.join(tmp_root, "replaced"))
    os.rename(folder, final)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return final


def prepare(o: Options) -> dict:
  """Reads the source and writes the domain; returns the counts written to prepare.json."""
  check_options(o)
  counts = Counts()
  meta = {"source": f"hf:{o.hf}" if o.hf else f"tfds:{o.tfds}",
          "options": dataclasses.asdict(o), "counts": counts}

  def triples():
    recs, where = records(o, o.split)
    if o.validation_split:
      val_recs, val_where = records(o, o.validation_split)
      for doc_id, text in documents(recs, o, o.split, where, counts):
        counts.train += 1
        yield "train", doc_id, text
      for doc_id, text in documents(val_recs, o, o.validation_split, val_where, counts):
        counts.validation += 1
        yield "validation", doc_id, text
    else:
      for doc_id, text in documents(recs, o, o.split, where, counts):
        split = "validation" if in_validation(text, o.validation_fraction) else "train"
        setattr(counts, split, getattr(counts, split) + 1)
        yield split, doc_id, text
    for split in sources_lib.SPLITS:
      if not getattr(counts, split):
        why = ("raise --validation_fraction or give --validation_split"
               if split == "validation" and not o.validation_split else "check --split, "
               "--validation_split, --text_field and --max_docs")
        raise PrepareError(f"no document went to {split} ({sum(counts.read.values())} read, "
                           f"{counts.skipped_empty} empty): {why}")
    meta["counts"] = dataclasses.asdict(counts)

  folder = write_domain(o, triples(), meta)
  return {"domain": o.domain, "folder": folder, **meta["counts"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m cpt_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  d = Options("", "")
  p.add_argument("--hf", default="", help="save_to_disk folder, data files (glob / folder) "
                 "or a Hugging Face Hub dataset name")
  p.add_argument("--hf_config", default="", help="the Hub dataset's configuration name")
  p.add_argument("--tfds", default="", help="a TFDS dataset name, built in --data_dir")
  p.add_argument("--data_dir", default="", help="TFDS data_dir")
  p.add_argument("--domain", required=True, help="the domain (folder) to write")
  p.add_argument("--out", required=True, help="the corpus folder (data.corpus_dir)")
  p.add_argument("--split", default=d.split, help="the source split to read")
  p.add_argument("--validation_split", default=d.validation_split,
                 help="a source split for validation.jsonl instead of --validation_fraction")
  p.add_argument("--validation_fraction", type=float, default=None,
                 help=f"share of documents hashed into validation (default "
                 f"{d.validation_fraction})")
  p.add_argument("--max_docs", type=int, default=d.max_docs,
                 help="at most this many documents per source split (0: all)")
  p.add_argument("--text_field", default=d.text_field, help="the field holding the text")
  p.add_argument("--id_field", default=d.id_field,
                 help="the field holding a document id (default: <split>:<index>)")
  p.add_argument("--text_by", default=d.text_by, help=".txt files: one document per line, "
                 "paragraph or document (file)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing domain")
  a = vars(p.parse_args(argv))
  if a["validation_split"] and a["validation_fraction"] is not None:
    print("error: give --validation_fraction or --validation_split, not both", file=sys.stderr)
    return 2
  if a["validation_fraction"] is None:
    a["validation_fraction"] = 0.0 if a["validation_split"] else d.validation_fraction
  try:
    summary = prepare(Options(**a))
  except PrepareError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
