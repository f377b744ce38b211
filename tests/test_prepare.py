"""`python -m cpt_jax.data.prepare`: HF `datasets` and TFDS datasets -> corpus domains.

The sources are written here: a dataset and a DatasetDict saved with `save_to_disk`,
parquet and JSONL files, and a TFDS dataset built into a data_dir by a builder defined
below. `datasets` probes for torch when imported, so it never loads in this process (see
tests/conftest.py): the fixtures and the command run in subprocesses.
"""

import importlib.util
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cpt_jax import config as config_lib
from cpt_jax.data import prepare
from cpt_jax.data import sources
from tests.conftest import REPO


HAVE_DATASETS = importlib.util.find_spec("datasets") is not None  # found, not imported
needs_datasets = pytest.mark.skipif(
    not HAVE_DATASETS, reason="the prepare extra: pip install -e '.[prepare]'")

_WORDS = ("the river bends past old mills where millers ground wheat for the town; "
          "überall große Straßen, café, naïve — 数据 and ∑ symbols too").split()


def _docs(n=240):
  """Documents with titles; a few empty, a few exact duplicates, mixed scripts."""
  rng = np.random.default_rng(0)
  docs = []
  for i in range(n):
    text = " ".join(rng.choice(_WORDS, int(rng.integers(4, 30))).tolist())
    if i % 37 == 5:
      text = "   " if i % 2 else ""
    if i % 50 == 49:
      text = docs[i - 40]["text"]  # an exact duplicate of an earlier document
    docs.append({"text": text, "title": f"doc-{i:03d}", "n": i})
  return docs


DOCS = _docs()
KEPT = [d for d in DOCS if d["text"].strip()]

HF_FIXTURES = textwrap.dedent("""
    import json, pathlib, sys
    import datasets
    root = pathlib.Path(sys.argv[1])
    docs = json.loads((root / "docs.json").read_text())
    ds = datasets.Dataset.from_list(docs)
    ds.save_to_disk(str(root / "my_dataset"))
    datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_list(docs[:9])}
                         ).save_to_disk(str(root / "my_dataset_dict"))
    (root / "web").mkdir()
    ds.select(range(100)).to_parquet(str(root / "web" / "part-0.parquet"))
    ds.select(range(100, len(docs))).to_parquet(str(root / "web" / "part-1.parquet"))
""")


def _env():
  path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1",
          "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _build_tfds(data_dir: pathlib.Path, dataset_name: str, docs) -> None:
  """A TFDS dataset built into data_dir by a builder of this process only."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "title": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for d in docs:
        yield d["title"], {"text": d["text"], "title": d["title"]}

  Builder(data_dir=str(data_dir)).download_and_prepare()


@pytest.fixture(name="data", scope="module")
def _data(tmp_path_factory):
  """The sources the README's commands name under /data/."""
  root = tmp_path_factory.mktemp("prepare") / "data"
  root.mkdir()
  (root / "docs.json").write_text(json.dumps(DOCS))
  with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
    for d in DOCS:
      f.write(json.dumps({"body": d["text"], "key": d["n"]}, ensure_ascii=False) + "\n")
  if HAVE_DATASETS:
    subprocess.run([sys.executable, "-c", HF_FIXTURES, str(root)], check=True, timeout=300,
                   env=_env(), capture_output=True)
  _build_tfds(root / "tensorflow_datasets", "my_tfds_dataset", DOCS)
  return root


def run_prepare(*args):
  return subprocess.run([sys.executable, "-m", "cpt_jax.data.prepare", *map(str, args)],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
                        check=False)


def _ok(*args) -> dict:
  res = run_prepare(*args)
  assert res.returncode == 0, res.stderr[-3000:]
  return json.loads(res.stdout.strip().splitlines()[-1])


def _records(folder, split):
  with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _read_back(corpus, domain):
  """{split: texts} read through the project's data sources, as a run reads the domain."""
  cfg = config_lib.default_config().data
  return {split: list(sources.read_texts(sources.make_source(cfg, str(corpus), domain, split)))
          for split in sources.SPLITS}


# ---------------------------------------------------------------- HF datasets


@needs_datasets
def test_saved_dataset_becomes_a_domain_with_a_split_that_depends_on_the_text_only(
    data, tmp_path):
  out = tmp_path / "corpus"
  summary = _ok("--hf", data / "my_dataset", "--domain", "mine", "--out", out,
                "--validation_fraction", "0.25")
  folder = out / "mine"
  train, val = _records(folder, "train"), _records(folder, "validation")
  assert summary["train"] == len(train) and summary["validation"] == len(val)
  assert summary["skipped_empty"] == len(DOCS) - len(KEPT) > 0
  assert 0.15 < len(val) / len(KEPT) < 0.35, len(val)
  # Every kept document once, with its source index as id, in source order within a split.
  for recs in (train, val):
    idx = [int(r["id"].split(":")[1]) for r in recs]
    assert idx == sorted(idx)
    assert all(r["text"] == DOCS[i]["text"] for r, i in zip(recs, idx))
  assert sorted(r["id"] for r in train + val) == sorted(f"train:{d['n']}" for d in KEPT)
  val_texts = {r["text"] for r in val}
  assert not val_texts & {r["text"] for r in train}, "a duplicate straddles the split"
  assert _read_back(out, "mine") == {"train": [r["text"] for r in train],
                                     "validation": [r["text"] for r in val]}
  meta = json.loads((folder / "prepare.json").read_text())
  assert meta["counts"]["read"] == {"train": len(KEPT)}

  # The same documents as parquet files in two parts: the same split; a cap reads fewer.
  again = _ok("--hf", data / "web" / "*.parquet", "--domain", "web", "--out", out,
              "--validation_fraction", "0.25", "--max_docs", 60)
  assert again["train"] + again["validation"] == 60
  assert {r["text"] for r in _records(out / "web", "validation")} <= val_texts
  assert {r["text"] for r in _records(out / "web", "train")} <= {r["text"] for r in train}
  assert sorted(p.name for p in out.iterdir()) == ["mine", "web"]  # no leftovers


@needs_datasets
def test_dataset_dict_validation_split_id_field_and_jsonl_text_field(data, tmp_path):
  out = tmp_path / "corpus"
  _ok("--hf", data / "my_dataset_dict", "--domain", "d", "--out", out, "--validation_split",
      "validation", "--id_field", "title")
  assert [r["id"] for r in _records(out / "d", "train")] == [d["title"] for d in KEPT]
  assert [r["text"] for r in _records(out / "d", "validation")] == [
      d["text"] for d in DOCS[:9] if d["text"].strip()]

  _ok("--hf", data / "docs.jsonl", "--domain", "j", "--out", out, "--text_field", "body",
      "--id_field", "key", "--max_docs", 30, "--validation_fraction", "0.3")
  got = _read_back(out, "j")
  assert len(got["train"]) + len(got["validation"]) == 30 and got["validation"]
  ids = [r["id"] for r in _records(out / "j", "train") + _records(out / "j", "validation")]
  assert sorted(map(int, ids)) == [d["n"] for d in KEPT[:30]]


@needs_datasets
def test_text_files_divide_by_paragraph(tmp_path):
  paragraphs = [f"paragraph {i} of the notes,\nits second line" for i in range(60)]
  (tmp_path / "notes").mkdir()
  for k in range(2):
    (tmp_path / "notes" / f"part{k}.txt").write_text("\n\n".join(paragraphs[k::2]) + "\n")
  _ok("--hf", tmp_path / "notes" / "*.txt", "--text_by", "paragraph", "--domain", "notes",
      "--out", tmp_path / "corpus", "--validation_fraction", "0.3")
  got = _read_back(tmp_path / "corpus", "notes")
  assert sorted(t.strip() for t in got["train"] + got["validation"]) == sorted(paragraphs)


PEAK_RSS = textwrap.dedent("""
    import resource, subprocess, sys
    res = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB
""")


@needs_datasets
def test_memory_does_not_grow_with_the_dataset(tmp_path):
  """Peak memory of prepare on 154 MB of JSONL against 22 MB: the same within 40 MB.

  Memory that followed the data would grow by the 132 MB between the two; the margin
  leaves room for the allocator on a loaded machine (peaks differ by up to 22 MB there
  whatever the size)."""
  # (`datasets` reads JSON in blocks of 10 MB: both files are past the first block.)
  doc = " ".join(_WORDS) * 30  # about 4 KB

  def peak_kib(n_docs, name):
    path = tmp_path / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
      for i in range(n_docs):
        f.write(json.dumps({"text": f"{i} {doc}"}, ensure_ascii=False) + "\n")
    res = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "cpt_jax.data.prepare", "--hf",
         str(path), "--domain", name, "--out", str(tmp_path / "corpus")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return int(res.stdout.split()[-1])

  small, large = peak_kib(5_000, "small"), peak_kib(35_000, "large")
  assert (tmp_path / "corpus" / "large" / "train.jsonl").stat().st_size > 140e6
  assert large - small < 40 * 1024, (small, large)


@needs_datasets
@pytest.mark.parametrize("args, match", [
    (("--hf", "{data}/my_dataset", "--text_field", "body"),
     r"--text_field 'body'.*has no such field; it has \['n', 'text', 'title'\]"),
    (("--hf", "{data}/docs.jsonl", "--text_field", "key"), r"record 0: --text_field holds int"),
    (("--hf", "{data}/my_dataset_dict", "--split", "test"),
     r"splits \['train', 'validation'\], not 'test' \(--split"),
    (("--hf", "{data}/my_dataset", "--validation_split", "validation"),
     r"--validation_split: .*single dataset without splits"),
    (("--hf", "{data}/docs.jsonl", "--text_field", "body", "--validation_split", "test"),
     r"--validation_split: .*names data files, which have no splits"),
    (("--hf", "some-user/some-dataset"),
     r"--hf 'some-user/some-dataset': could not be loaded from the Hugging Face Hub"),
    (("--hf", "{data}/nothing/*.parquet"), r"--hf .*: no file matches"),
    (("--hf", "{data}/my_dataset", "--max_docs", "3"), r"no document went to validation"),
])
def test_bad_hf_input_is_an_error_naming_the_argument(data, tmp_path, args, match):
  res = run_prepare(*[a.format(data=data) for a in args], "--domain", "x", "--out",
                    tmp_path / "corpus")
  assert res.returncode == 2, res.stderr[-3000:]
  assert re.search(match, res.stderr), res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  assert not (tmp_path / "corpus" / "x").exists()


# ---------------------------------------------------------------- TFDS


def test_tfds_dataset_built_in_a_data_dir_becomes_a_domain(data, tmp_path):
  out = tmp_path / "corpus"
  summary = _ok("--tfds", "my_tfds_dataset", "--data_dir", data / "tensorflow_datasets",
                "--domain", "wiki", "--out", out, "--id_field", "title",
                "--validation_fraction", "0.25")
  got = _read_back(out, "wiki")
  by_title = {d["title"]: d["text"] for d in KEPT}
  recs = _records(out / "wiki", "train") + _records(out / "wiki", "validation")
  assert sorted(r["id"] for r in recs) == sorted(by_title)
  assert all(r["text"] == by_title[r["id"]] for r in recs)
  assert got["validation"] and summary["skipped_empty"] == len(DOCS) - len(KEPT)
  bad = run_prepare("--tfds", "not_built_here", "--data_dir", data / "tensorflow_datasets",
                    "--domain", "x", "--out", out)
  assert bad.returncode == 2 and "--tfds 'not_built_here': not found in --data_dir" in \
      bad.stderr, bad.stderr[-3000:]
  bad = run_prepare("--tfds", "my_tfds_dataset", "--data_dir", data / "tensorflow_datasets",
                    "--domain", "x", "--out", out, "--split", "test")
  assert bad.returncode == 2 and "has splits ['train']" in bad.stderr, bad.stderr[-3000:]


# ---------------------------------------------------------------- arguments, writing


@pytest.mark.parametrize("args, match", [
    ([], "give exactly one source"),
    (["--hf", "a", "--tfds", "b"], "give exactly one source"),
    (["--hf", "a", "--domain", ".hidden"], "--domain '.hidden'"),
    (["--hf", "a", "--domain", "a,b"], "--domain 'a,b'"),
    (["--hf", "a", "--validation_fraction", "0"], "--validation_fraction 0.0: must be in"),
    (["--hf", "a", "--validation_fraction", "1"], "--validation_fraction 1.0: must be in"),
    (["--hf", "a", "--validation_split", "train"], "--validation_split 'train' is --split"),
    (["--hf", "a", "--validation_split", "v", "--validation_fraction", "0.1"],
     "--validation_fraction or --validation_split, not both"),
    (["--hf", "a", "--max_docs", "-1"], "--max_docs -1"),
    (["--hf", "a", "--text_by", "page"], "--text_by 'page'"),
    (["--hf", "a", "--data_dir", "/tmp"], "--data_dir goes with --tfds"),
    (["--tfds", "a", "--data_dir", "/no/such/dir"], "--data_dir '/no/such/dir'"),
])
def test_bad_arguments_are_named_before_anything_is_read(tmp_path, capsys, args, match):
  argv = args + ([] if "--domain" in args else ["--domain", "x"])
  assert prepare.main(argv + ["--out", str(tmp_path / "corpus")]) == 2
  assert match in capsys.readouterr().err
  assert not (tmp_path / "corpus").exists()


def _options(tmp_path, **kw):
  return prepare.Options(out=str(tmp_path / "corpus"), domain="d", hf="unused", **kw)


def test_an_existing_domain_needs_overwrite_and_survives_a_failed_one(tmp_path, capsys):
  old = sources.SPLITS
  (tmp_path / "corpus" / "d").mkdir(parents=True)
  for split in old:
    (tmp_path / "corpus" / "d" / f"{split}.jsonl").write_text('{"id": "0", "text": "old"}\n')
  assert prepare.main(["--hf", "x", "--domain", "d", "--out", str(tmp_path / "corpus")]) == 2
  assert "exists; pass --overwrite" in capsys.readouterr().err

  def failing():
    for i in range(100):
      yield "train", str(i), f"new {i}"
    raise prepare.PrepareError("record 100: broken")

  with pytest.raises(prepare.PrepareError, match="record 100"):
    prepare.write_domain(_options(tmp_path, overwrite=True), failing(), {})
  assert _read_back(tmp_path / "corpus", "d") == {"train": ["old"], "validation": ["old"]}
  assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["d"]

  prepare.write_domain(_options(tmp_path, overwrite=True),
                       [("train", "1", "new"), ("validation", "2", "newer")], {})
  assert _read_back(tmp_path / "corpus", "d") == {"train": ["new"], "validation": ["newer"]}
  assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["d"]


KILLED = textwrap.dedent("""
    import os, signal, sys
    from cpt_jax.data import prepare
    def docs():
      for i in range(10**9):
        if i == 5000:
          os.kill(os.getpid(), signal.SIGKILL)
        yield ("validation" if i % 10 == 0 else "train"), str(i), f"document {i}"
    prepare.write_domain(prepare.Options(out=sys.argv[1], domain="d", hf="x"), docs(), {})
""")


def test_a_killed_prepare_leaves_no_domain_in_the_corpus(tmp_path):
  corpus = tmp_path / "corpus"
  res = subprocess.run([sys.executable, "-c", KILLED, str(corpus)], env=_env(),
                       capture_output=True, text=True, timeout=300, check=False)
  assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
  assert sources.list_domains(str(corpus), "jsonl") == []
  leftovers = list(corpus.iterdir())
  assert len(leftovers) == 1 and leftovers[0].name.startswith(".prepare-d.")
  assert (leftovers[0] / "d" / "train.jsonl").stat().st_size > 0  # it was killed mid-write


def test_documents_stream_from_an_endless_source_up_to_the_cap(tmp_path):
  """Nothing holds the source: an endless one with --max_docs is read to the cap only."""
  def endless():
    i = 0
    while True:
      yield {"text": f"document {i} " * 3, "n": i}
      i += 1

  o = _options(tmp_path, max_docs=2000, id_field="n", validation_fraction=0.1)
  counts = prepare.Counts()
  docs = prepare.documents(endless(), o, "train", "endless", counts)
  prepare.write_domain(o, (("validation" if prepare.in_validation(t, 0.1) else "train", i, t)
                           for i, t in docs), {})
  got = _read_back(tmp_path / "corpus", "d")
  assert len(got["train"]) + len(got["validation"]) == 2000 == counts.read["train"]
  assert 100 < len(got["validation"]) < 300


# ---------------------------------------------------------------- the README's commands


def _readme_block(title):
  readme = (REPO / "README.md").read_text()
  section = readme.split(title, 1)[1]
  return re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")


@needs_datasets
def test_readme_preparing_data_commands_run_and_train_on_the_prepared_corpus(data, tmp_path):
  """Every command of the README's "Preparing data" block, /data/ and /tmp/ moved here.

  The training command gets extra flags that make it two steps long.
  """
  commands = [c.strip() for c in _readme_block("### Preparing data").splitlines() if c.strip()]
  assert sum(c.startswith("python -m cpt_jax.data.prepare") for c in commands) >= 3
  assert commands[-1].startswith("python -m cpt_jax.main")
  short = ["--config.train.steps=2", "--config.train.log_every=1",
           "--config.train.checkpoint_every=2", "--config.train.progress_bar=false",
           "--config.data.seq_len=32", "--config.data.prefetch=0",
           "--config.train.eval_batches=1"]
  moved = lambda m: f"{data if m.group(1) == 'data' else tmp_path}/"
  for command in commands:
    argv = [re.sub(r"(?<![\w.])/(data|tmp)/", moved, a) for a in shlex.split(command)]
    argv[0] = sys.executable
    if argv[2] == "cpt_jax.main":
      argv += short
    res = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, f"{command}\n{res.stderr[-3000:]}"
  corpus = data / "corpus"
  assert sources.list_domains(str(corpus), "jsonl") == ["my_domain", "web", "wiki"]
  workdir = next(p for p in tmp_path.iterdir() if p.is_dir())
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["step"] == 2
  assert set(records[-1]["domain_loss"]) >= {"my_domain", "web", "wiki"}, records[-1]
