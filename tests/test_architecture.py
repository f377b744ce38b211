"""The package's layers: import-linter's contracts (pyproject.toml) and no hidden imports."""

import ast
import shutil
import subprocess

import pytest

from tests.conftest import REPO

# Optional heavy dependencies may load inside functions (only where they are used).
LAZY_OK = ("tensorflow", "tensorflow_datasets", "seqio", "torch", "transformers",
           "safetensors", "sentencepiece", "tokenizers", "matplotlib", "pydoc_data",
           "datasets", "ray", "apache_beam")


def test_import_contracts_hold():
  """`lint-imports` (import-linter): layers only point down; only stages / CLI import the loop."""
  exe = shutil.which("lint-imports")
  if exe is None:
    pytest.skip("import-linter not installed: pip install -e '.[dev]'")
  res = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
  assert "0 broken" in res.stdout


def test_no_project_import_inside_a_function():
  """Imports inside functions would hide a cycle from the contracts above."""
  found = []
  for path in sorted((REPO / "cpt_jax").rglob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
          if name.split(".")[0] not in LAZY_OK:
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
  assert not found, found
