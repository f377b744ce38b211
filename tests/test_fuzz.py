"""Fuzzed inputs (hypothesis): JSONL lines and command-line config overrides.

The only outcomes allowed: the input is read / the config accepted (bad JSONL lines skipped
and counted with data.on_bad_line='skip'), or the project's own clear error: DataError
naming the file and line, a ValueError naming a config key, or the one-line message
`python -m cpt_jax.main` prints for a command line it cannot parse. Never another
exception. Each test prints how many cases it tried.
"""

import json
import os
import re
import tempfile

from absl import flags
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from ml_collections import config_flags
import ml_collections
import pytest

from cpt_jax import config as config_lib
from cpt_jax import main as main_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.data import store as store_lib
from cpt_jax.data import vocab as vocab_lib
from tests.helpers import REPO

FUZZ = settings(max_examples=int(os.environ.get("CPT_FUZZ_EXAMPLES", "150")), deadline=None,
                derandomize=not os.environ.get("CPT_FUZZ_EXAMPLES"),
                suppress_health_check=list(HealthCheck))
TRIED = {"jsonl": 0, "store": 0, "config": 0, "config_parsed": 0, "config_accepted": 0}

# ------------------------------------------------------------------ JSONL lines

_texts = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=6)
_line = st.one_of(
    st.builds(lambda t: json.dumps({"id": "x", "text": t}).encode(), _texts),  # valid
    st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False)
              .encode("utf-8", "surrogatepass"), _texts),  # raw UTF-8, lone surrogates too
    st.builds(lambda v: json.dumps({"text": v}).encode(), _json_values),  # wrong types
    st.builds(lambda v: json.dumps(v).encode(), _json_values),  # not a record
    st.binary(max_size=60),  # malformed JSON, invalid UTF-8, control bytes, NULs
    st.builds(lambda c, n: json.dumps({"text": c * n}).encode(),  # huge lines
              st.sampled_from(["a", "\u00e9", "\x00", "\u2028", "\U0001f600"]),
              st.integers(10_000, 300_000)),
    st.builds(lambda t: (json.dumps({"text": "ok"})[:-1] + t).encode("utf-8", "replace"),
              _texts),  # cut or trailing garbage
)
_corpus = st.lists(_line, min_size=0, max_size=12)


def _write(tmp_path, lines, ending=b"\n"):
  folder = tmp_path / "fuzz"
  folder.mkdir(exist_ok=True)
  path = folder / "train.jsonl"
  path.write_bytes(b"".join(l.replace(b"\n", b" ").replace(b"\r", b" ") + ending
                            for l in lines))
  return sources_lib.Source("jsonl", "fuzz", "train", (str(path),)), str(path)


def _check_error(err, path, n_lines):
  m = re.match(re.escape(path) + r":(\d+): ", str(err))
  assert m and 1 <= int(m[1]) <= n_lines, err


@FUZZ
@given(lines=_corpus)
def test_fuzzed_jsonl_lines_are_read_skipped_or_named(tmp_path_factory, lines):
  TRIED["jsonl"] += 1
  src, path = _write(tmp_path_factory.mktemp("j"), lines)
  stats = sources_lib.ReadStats()
  texts = list(sources_lib.read_texts(src, "skip", stats=stats))
  assert all(isinstance(t, str) for t in texts) and stats.docs == len(texts)
  for t in texts:
    t.encode("utf-8")  # what is kept encodes
  assert stats.docs + stats.skipped <= len(lines)
  try:
    strict = list(sources_lib.read_texts(src, "error"))
  except sources_lib.DataError as e:
    assert stats.skipped > 0
    _check_error(e, path, len(lines))
  else:
    assert strict == texts and stats.skipped == 0


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(lines=_corpus, on_bad_line=st.sampled_from(["skip", "error"]))
def test_fuzzed_jsonl_builds_a_store_or_names_the_file(tmp_path_factory, lines, on_bad_line):
  TRIED["store"] += 1
  tmp = tmp_path_factory.mktemp("s")
  src, path = _write(tmp, lines)
  try:
    store = store_lib.build_or_load(src, vocab_lib.make_vocab("byte"), 32, str(tmp / "cache"),
                                    on_bad_line=on_bad_line)
  except sources_lib.DataError as e:
    assert path in str(e)
  else:
    assert store.num_rows > 0


# ------------------------------------------------------------------ config overrides

def _leaves(cfg, prefix=""):
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


SCHEMA_KEYS = sorted(k for k in _leaves(config_lib.default_config())
                     if not k.startswith(("stages", "sharding.logical_axis_rules")))
_key = st.sampled_from(SCHEMA_KEYS) | st.builds(
    lambda g, k: f"{g}.{k}", st.sampled_from(["train", "model", "data", "replay", "nope"]),
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
_value = st.one_of(
    st.integers(-3, 5).map(str), st.integers().map(str),
    st.sampled_from(["0", "-1", "0.0", "1e-9", "1e30", "nan", "inf", "-inf", "True", "false",
                     "None", "''", "()", "(0, 0, 0)", "(-1, 2, 1)", "[1]", "{}", "alpha",
                     "alpha,beta", "alpha:2,beta:-1", "byte", "rollback", "stop"]),
    st.floats(allow_nan=True).map(repr),
    st.text(max_size=20))


_CONFIG_FILE = os.path.join(tempfile.mkdtemp(prefix="cpt_fuzz_"), "default.py")
with open(_CONFIG_FILE, "w", encoding="utf-8") as _f:
  _f.write(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom tests import helpers\n\n"
           "def get_config():\n  return helpers.tiny_config()\n")


def _parse(args):
  """The command line's config as `python -m cpt_jax.main` parses it."""
  fv = flags.FlagValues()
  argv = ["cpt_jax.main", f"--config={_CONFIG_FILE}", *args]
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


_DEFAULTS = config_lib.default_config()


def _typed(key):
  """Values of the key's own type (so most parse and reach validate_config)."""
  default = _DEFAULTS
  for part in key.split("."):
    default = default[part]
  if isinstance(default, bool):
    return st.sampled_from(["true", "false"])
  if isinstance(default, int):
    return st.integers(-2, 9).map(str) | st.integers().map(str)
  if isinstance(default, float):
    return st.floats(allow_nan=True).map(repr) | st.sampled_from(["0.0", "-1.0", "2.0"])
  if isinstance(default, str):
    return st.sampled_from(["", "alpha", "beta,gamma", "alpha:1,beta:0", "x:-1", "rollback",
                            "none", "cosine", "byte", "random", "online"]) | st.text(max_size=12)
  return _value


_override = st.tuples(_key, _value) | st.sampled_from(SCHEMA_KEYS).flatmap(
    lambda k: st.tuples(st.just(k), _typed(k)))


@FUZZ
@given(overrides=st.lists(_override, min_size=1, max_size=3))
def test_fuzzed_config_overrides_run_or_name_a_key(overrides):
  TRIED["config"] += 1
  argv = ["cpt_jax.main"] + [f"--config.{k}={v}" for k, v in overrides]
  try:
    cfg = _parse(argv[1:])
  except main_lib._FLAG_ERRORS as e:  # what main prints as one `error:` line, status 2
    line = main_lib.flag_error_message(e, argv)
    assert line and "\n" not in line
    return
  TRIED["config_parsed"] += 1
  try:
    config_lib.validate_config(cfg, num_devices=1)
    TRIED["config_accepted"] += 1
  except ValueError as e:
    assert main_lib.is_user_error(e), e
    assert re.search(r"[a-z_]+\.[a-z_]+", str(e)), e  # names a key


def test_zz_report_cases_tried():
  """Prints the number of cases the fuzz tests above tried (run in file order)."""
  print(f"fuzz cases tried: {TRIED}")
  if sum(TRIED.values()) == 0:
    pytest.skip("run with the fuzz tests")
