"""Paths on any filesystem: local folders and bucket URIs (gs://, s3://) alike.

Every file the project reads or writes goes through `etils.epath` (what Orbax uses), so a
workdir, corpus, checkpoint or model folder may be `gs://bucket/...`. `as_path` never turns
a URI into a local path (`os.path.abspath('gs://b/run')` is `<cwd>/gs:/b/run`).

gs:// goes through fsspec's gcsfs (it honours `STORAGE_EMULATOR_HOST`), not tf.io.gfile:
epath picks TensorFlow's gfile whenever TensorFlow is installed, which loads TensorFlow into
a plain run and has no endpoint override. `EPATH_USE_TF=1` in the environment brings it back.

Object stores have no append, no atomic rename and no O_EXCL. What they publish atomically
is one object written whole (a reader sees the old object or the new one, never a part of
it), so on a bucket `write_atomic` writes the object in one piece, `append_text` rewrites
it, and `create_new` uses the store's create-only precondition (GCS `ifGenerationMatch=0`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile

os.environ.setdefault("EPATH_USE_TF", "false")  # before epath picks a gs:// backend

import fsspec  # noqa: E402
from etils import epath  # noqa: E402

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URI on a store other than the local disk (gs://b/x: True)."""
  p = os.fspath(path)
  return bool(_URI.match(p)) and not p.startswith("file://")


def as_path(path: str | os.PathLike, *parts: str) -> epath.Path:
  """`path` (joined with `parts`) as an epath.Path: a URI stays a URI, a local path becomes
  absolute."""
  p = os.fspath(path)
  if p.startswith("file://"):
    p = p[len("file://"):]
  base = epath.Path(p) if is_remote(p) else epath.Path(os.path.abspath(os.path.expanduser(p)))
  return base.joinpath(*parts)


def absolute(path: str | os.PathLike) -> str:
  """The string form of `as_path(path)` (what configs and records hold)."""
  return os.fspath(as_path(path))


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
  """Replaces `path` with `content` in one step: readers see the old file or the new.

  Local: a temporary file, fsync, rename. Bucket: one object write (published whole)."""
  data = content.encode("utf-8") if isinstance(content, str) else content
  p = as_path(path)
  if is_remote(p):
    p.write_bytes(data)
    return
  tmp = f"{p}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, p)


def append_text(path: str | os.PathLike, text: str) -> None:
  """Appends `text` to `path` (created if absent); on a bucket the object is rewritten whole."""
  p = as_path(path)
  if is_remote(p):
    old = p.read_bytes() if p.exists() else b""
    p.write_bytes(old + text.encode("utf-8"))
    return
  with open(p, "a", encoding="utf-8") as f:
    f.write(text)


def create_new(path: str | os.PathLike, content: str | bytes) -> bool:
  """Creates `path` with `content` only if it does not exist; False if it does.

  Local: O_EXCL. Bucket: fsspec's create-only write (gcsfs: `ifGenerationMatch=0`, so of
  two concurrent creators exactly one succeeds)."""
  data = content.encode("utf-8") if isinstance(content, str) else content
  p = as_path(path)
  if is_remote(p):
    fs, key = fsspec.core.url_to_fs(os.fspath(p))
    try:
      fs.pipe_file(key, data, mode="create")
    except FileExistsError:
      return False
    return True
  try:
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  return True


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a file or folder (local: one rename; bucket: copy, then delete the source)."""
  if not (is_remote(src) or is_remote(dst)):
    os.rename(as_path(src), as_path(dst))
    return
  fs, _ = fsspec.core.url_to_fs(os.fspath(as_path(src)))
  # copy + rm rather than fs.mv: gcsfs's mv tries the newer objects.move call first,
  # which servers without it (older endpoints, emulators) answer 501, retried for ~30 s.
  fs.copy(os.fspath(as_path(src)), os.fspath(as_path(dst)), recursive=True)
  fs.rm(os.fspath(as_path(src)), recursive=True)


def upload_tree(local_dir: str, dst: str | os.PathLike) -> None:
  """Copies the files under the local folder `local_dir` into `dst` (any filesystem)."""
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    for name in files:
      target = as_path(dst) if rel == "." else as_path(dst, rel)
      target.mkdir(parents=True, exist_ok=True)
      with open(os.path.join(root, name), "rb") as f:
        write_atomic(target / name, f.read())


def staging_dir(dst: str | os.PathLike, prefix: str = "cpt_jax-") -> str:
  """A local folder to write `dst`'s files into: `dst` itself when it is local (created),
  else a new temporary folder that `publish_dir` uploads to `dst` and removes."""
  if not is_remote(dst):
    os.makedirs(dst, exist_ok=True)
    return os.fspath(dst)
  return tempfile.mkdtemp(prefix=prefix)


def publish_dir(local_dir: str, dst: str | os.PathLike, upload: bool = True) -> None:
  """Finishes a `staging_dir(dst)`: uploads it to `dst` (when `upload`) and removes it.
  A no-op when `dst` is local (the files are already there)."""
  if os.fspath(local_dir) == os.fspath(dst):
    return
  if upload:
    upload_tree(local_dir, dst)
  shutil.rmtree(local_dir, ignore_errors=True)


def mtime(path: str | os.PathLike) -> float:
  """Seconds since the epoch of the last write (a bucket's object update time)."""
  return float(as_path(path).stat().mtime)


def local_copy(path: str | os.PathLike, cache_dir: str | None = None) -> str:
  """A local folder (or file) with `path`'s content: `path` itself when it is local, else a
  copy under `cache_dir` (default: the temp folder), downloaded once per URI and content
  (names, sizes, times), for readers that need a real file (safetensors, tokenizers)."""
  p = as_path(path)
  if not is_remote(p):
    return os.fspath(p)
  files = files_under(p) if p.is_dir() else [p]
  rels = [os.fspath(f)[len(os.fspath(p)):].lstrip("/") for f in files]
  stats = [f.stat() for f in files]
  ident = json.dumps([os.fspath(p)] + [[r, s.length, s.mtime] for r, s in zip(rels, stats)])
  key = hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16]
  root = cache_dir or os.path.join(tempfile.gettempdir(), "cpt_jax_remote_cache")
  os.makedirs(root, exist_ok=True)
  out = os.path.join(root, f"{key}-{p.name}")
  if os.path.exists(out):
    return out
  tmp = tempfile.mkdtemp(prefix=f".tmp-{key}.", dir=root)
  for src, rel in zip(files, rels):
    dst = os.path.join(tmp, p.name, rel) if rel else os.path.join(tmp, p.name)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
      f.write(src.read_bytes())
  try:
    os.rename(os.path.join(tmp, p.name), out)  # whole or absent; a concurrent copy may win
  except OSError:
    if not os.path.exists(out):
      raise
  shutil.rmtree(tmp, ignore_errors=True)
  return out


def files_under(folder: epath.Path) -> list[epath.Path]:
  """Every file below `folder`, sorted (epath's walk loses a bucket's gs:// prefix)."""
  out = []
  for child in folder.iterdir():
    out.extend(files_under(child) if child.is_dir() else [child])
  return sorted(out, key=os.fspath)
