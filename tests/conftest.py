"""Test set-up: 8 host CPU devices (before JAX initialises) and shared tiny configs."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] += "" if "device_count" in os.environ["XLA_FLAGS"] else \
    " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session: pytest's workers and every subprocess a
# test starts (they inherit this environment) load a program another one compiled instead
# of compiling it again (most of a tiny run's time). Fresh per session, removed at its end.
JIT_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  JIT_CACHE = tempfile.mkdtemp(prefix="cpt_jax-tests-jit-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = JIT_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import importlib.abc  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark harnesses live outside the package

NO_TORCH_HERE = ("torch", "transformers")


class _NoTorchHere(importlib.abc.MetaPathFinder):
  """Refuses torch and transformers in the test process (issue 21).

  seqio loads TensorFlow here; TensorFlow, then torch, then transformers'
  LlamaForCausalLM segfaults with CUDA builds of torch. Tests that need them run
  tests/hf_parity_worker.py in a subprocess. A library that tries them gets the usual
  ImportError of an optional dependency.
  """

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname.split(".")[0] in NO_TORCH_HERE:
      raise ModuleNotFoundError(f"{fullname} must not load in the test process, beside TensorFlow "
                        f"(segfaults, issue 21): run it in a subprocess such as "
                        f"tests/hf_parity_worker.py", name=fullname)
    return None


sys.meta_path.insert(0, _NoTorchHere())


def pytest_unconfigure(config):
  del config
  if JIT_CACHE:  # the process that made it: the only one, or pytest-xdist's controller
    shutil.rmtree(JIT_CACHE, ignore_errors=True)


def corpora_dir() -> pathlib.Path | None:
  """The shared real-text corpora, or None when absent."""
  path = pathlib.Path(os.environ.get("CPT_CORPORA", REPO.parent / "shared" / "corpora"))
  return path if path.is_dir() else None


@pytest.fixture
def corpora():
  path = corpora_dir()
  if path is None:
    pytest.skip("shared corpora not found (set CPT_CORPORA)")
  return path


# The longest files (minutes each on 2 cores), scheduled first so that pytest-xdist's two
# workers (README: `-n 2 --dist loadfile`) finish together instead of one waiting on the
# last long file. Only the order of files changes; tests keep their order within a file.
LONGEST_FILES = ("test_prepare.py", "test_benchmarks.py", "test_cpt_suite.py",
                 "test_multiprocess.py", "test_hf.py", "test_model.py", "test_decomposition.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
