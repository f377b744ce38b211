"""A local GCS server for the tests and benchmarks: gcp-storage-emulator, with two behaviours
of GCS it lacks, and `serving` to start it on a free port with the clients pointed at it.

  python tests/gcs_server.py [gcp-storage-emulator arguments]

- Downloads carry the object's `x-goog-generation` header. TensorStore reads an object's
  generation from it and makes its next conditional write against that generation; without
  it an OCDBT manifest (Orbax's checkpoint arrays) fails to commit with "Malformed
  StorageGeneration".
- Uploads honour `ifGenerationMatch` (0: create only) with 412 Precondition Failed, as GCS
  does; gcsfs's create-only write (the workdir lock) relies on it.

`serving(data_dir, bucket)` runs this file in a subprocess and points each client a run uses
at it: gcsfs (etils.epath's gs:// backend, cpt_jax/paths.py) by STORAGE_EMULATOR_HOST,
TensorStore (Orbax's arrays) by TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING.
Importing this module needs neither package; `missing()` names the ones not installed.
"""

from __future__ import annotations

import contextlib
from http import HTTPStatus
import importlib.util
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

try:  # the server side; the starter below needs none of it
  from gcp_storage_emulator import __main__ as emulator_main
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  _DOWNLOAD, _INSERT = objects.download, objects.insert
except ImportError:
  emulator_main = None


def _generation(storage, bucket: str, name: str) -> str | None:
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return None


def download(request, response, storage, *args, **kwargs):
  gen = _generation(storage, request.params["bucket_name"], request.params["object_id"])
  if gen is not None:
    response["x-goog-generation"] = gen
  return _DOWNLOAD(request, response, storage, *args, **kwargs)


def _upload_name(request) -> str | None:
  """The object an upload writes: `name` in the query, else in its JSON metadata."""
  name = (request.query.get("name") or [None])[0]
  if name:
    return name
  data = request.data  # parsed once; the upload handler reads the same
  meta = data.get("meta") if isinstance(data, dict) and "meta" in data else data
  return meta.get("name") if isinstance(meta, dict) else None


def insert(request, response, storage, *args, **kwargs):
  want = (request.query.get("ifGenerationMatch") or [None])[0]
  name = _upload_name(request) if want is not None else None
  if name:
    have = _generation(storage, request.params["bucket_name"], name)
    if (have or "0") != want:
      response.status = HTTPStatus.PRECONDITION_FAILED
      response.json({"error": {"code": 412, "message": "Precondition Failed"}})
      return None
  return _INSERT(request, response, storage, *args, **kwargs)


def patch_handlers() -> None:
  for _, handlers in server.HANDLERS:
    for method, fn in list(handlers.items()):
      handlers[method] = {_DOWNLOAD: download, _INSERT: insert}.get(fn, fn)
  objects.download, objects.insert = download, insert  # the router's fallback uses these


# ------------------------------------------------------------------------------- the starter


def missing() -> list[str]:
  """The packages a local GCS server and its gs:// client need that are not installed."""
  return [m for m in ("gcp_storage_emulator", "gcsfs") if importlib.util.find_spec(m) is None]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """This server in a subprocess, one bucket, objects in memory; `objects` lists it over HTTP."""

  def __init__(self, data_dir: pathlib.Path, bucket: str):
    self.bucket, self.port = bucket, _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    # A line per request: a pipe left unread would fill.
    self.log = pathlib.Path(data_dir) / "server.log"
    self._log_file = open(self.log, "wb")
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "-d", str(data_dir), "start",
         "--host", "127.0.0.1", "--port", str(self.port), "--default-bucket", bucket, "-q",
         "--in-memory"],
        stdout=self._log_file, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}", timeout=2).read()
        return
      except OSError:
        if self.proc.poll() is not None or time.time() > deadline:
          self.close()
          raise RuntimeError(f"gcp-storage-emulator did not start: "
                             f"{self.log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)

  def objects(self, prefix: str = "") -> list[str]:
    """Names of the bucket's objects under `prefix`, through the JSON API."""
    names, token = [], None
    while True:
      q = {"prefix": prefix, **({"pageToken": token} if token else {})}
      url = f"{self.url}/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(q)}"
      page = json.loads(urllib.request.urlopen(url, timeout=30).read())
      names += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, name: str) -> bytes:
    url = (f"{self.url}/download/storage/v1/b/{self.bucket}/o/"
           f"{urllib.parse.quote(name, safe='')}")
    return urllib.request.urlopen(f"{url}?alt=media", timeout=30).read()

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._log_file.close()


@contextlib.contextmanager
def serving(data_dir: pathlib.Path, bucket: str):
  """A started Server, with this process's gs:// clients pointed at it until the block ends."""
  server_ = Server(data_dir, bucket)
  env = {"STORAGE_EMULATOR_HOST": server_.url, "TENSORSTORE_GCS_HTTP_URL": server_.url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "True",
         "TENSORSTORE_GCS_REQUEST_CONCURRENCY": "1"}  # the server answers one at a time
  # Without credentials gcsfs warns on every call that it cannot ask for the bucket's type.
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield server_
  finally:
    server_.close()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


if __name__ == "__main__":
  patch_handlers()
  emulator_main.main(sys.argv[1:])
