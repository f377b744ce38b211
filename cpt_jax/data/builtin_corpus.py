"""A small real-text corpus built from the running Python's standard library.

Every machine with Python has it, so demos and tests need no download:

  py_code        module sources (.py files)
  py_docstrings  docstrings of each module, class and function (via ast)
  py_help        the prose help topics of pydoc_data.topics
  py_tests       test modules (Lib/test), else the shipped text files (LICENSE, *.txt)

Same folder format as ../shared/corpora (train.jsonl / validation.jsonl,
{"id", "text"} per line, sorted by id). Deterministic for a given Python;
documents are taken in sha256(id) order, the first max(5, max_docs/10)
to validation, the rest to train up to the size caps.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import tempfile

_MAX_CHARS = 20000
_MIN_CHARS = 100


def _stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def _py_files(root: str, exclude_tests: bool) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    parts = rel.split(os.sep)
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__",
                                                          "idlelib", "lib2to3", "ensurepip"))
    if exclude_tests and ("test" in parts or "tests" in parts or rel.startswith("test")):
      continue
    out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
  return sorted(out)


def _read(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (UnicodeDecodeError, OSError):
    return None


def _cut(text: str) -> str:
  text = "\n".join(l.rstrip() for l in text.replace("\r\n", "\n").split("\n")).strip()
  if len(text) > _MAX_CHARS:
    cut = text.rfind("\n", 0, _MAX_CHARS)
    text = text[:cut if cut > 0 else _MAX_CHARS]
  return text


def _code_docs(root: str):
  for p in _py_files(root, exclude_tests=True):
    yield "py_code/" + os.path.relpath(p, root), lambda p=p: _read(p)


def _docstrings(path: str, root: str) -> str | None:
  t = _read(path)
  if not t:
    return None
  try:
    tree = ast.parse(t)
  except (SyntaxError, ValueError):
    return None
  parts = []
  for node in [tree, *ast.walk(tree)]:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc:
        parts.append(f"{getattr(node, 'name', os.path.relpath(path, root))}\n{doc}")
  return "\n\n".join(dict.fromkeys(parts))


def _docstring_docs(root: str):
  for p in _py_files(root, exclude_tests=True):
    yield "py_docstrings/" + os.path.relpath(p, root), lambda p=p: _docstrings(p, root)


def _help_docs():
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  for k, v in sorted(topics.topics.items()):
    yield "py_help/" + k, lambda v=v: v


def _test_docs(root: str):
  tdir = os.path.join(root, "test")
  files = _py_files(tdir, exclude_tests=False) if os.path.isdir(tdir) else []
  if len(files) < 20:  # no test suite installed: the text files shipped with CPython
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
      files += [os.path.join(dirpath, f) for f in sorted(filenames)
                if f.endswith(".txt") or f.startswith("LICENSE")]
  for p in sorted(files):
    yield "py_tests/" + os.path.relpath(p, root), lambda p=p: _read(p)


def _h(tag: str, doc_id: str) -> str:
  return hashlib.sha256(f"cpt-stdlib-v1:{tag}:{doc_id}".encode()).hexdigest()


def _write_jsonl(path: str, docs: list[tuple[str, str]]) -> None:
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    for doc_id, text in docs:
      f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def write_stdlib_corpus(out_dir: str, max_docs_per_domain: int = 200,
                        max_bytes_per_domain: int = 400_000) -> str:
  """Writes 4 domains under out_dir (train.jsonl / validation.jsonl each); returns out_dir."""
  root = _stdlib_dir()
  domains = {
      "py_code": _code_docs(root),
      "py_docstrings": _docstring_docs(root),
      "py_help": _help_docs(),
      "py_tests": _test_docs(root),
  }
  for name, candidates in domains.items():
    # Candidates in a hash order; the first accepted ones go to validation.
    candidates = sorted(candidates, key=lambda c: _h("keep", c[0]))
    n_val = max(5, max_docs_per_domain // 10)
    seen, val, train, nbytes = set(), [], [], 0
    for doc_id, load in candidates:
      if len(train) >= max_docs_per_domain or nbytes >= max_bytes_per_domain:
        break
      text = load()
      text = _cut(text) if text else ""
      if len(text) < _MIN_CHARS or text in seen:
        continue
      seen.add(text)
      if len(val) < n_val:
        val.append((doc_id, text))
      else:
        train.append((doc_id, text))
        nbytes += len(text.encode("utf-8"))
    if not train:
      raise RuntimeError(f"stdlib corpus: domain {name} has too few documents under {root}")
    ddir = os.path.join(out_dir, name)
    os.makedirs(ddir, exist_ok=True)
    _write_jsonl(os.path.join(ddir, "train.jsonl"), sorted(train))
    _write_jsonl(os.path.join(ddir, "validation.jsonl"), sorted(val))
  return out_dir
