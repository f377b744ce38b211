"""A local GCS server for the tests: gcp-storage-emulator, with two behaviours of GCS it lacks.

  python tests/gcs_server.py [gcp-storage-emulator arguments]

- Downloads carry the object's `x-goog-generation` header. TensorStore reads an object's
  generation from it and makes its next conditional write against that generation; without
  it an OCDBT manifest (Orbax's checkpoint arrays) fails to commit with "Malformed
  StorageGeneration".
- Uploads honour `ifGenerationMatch` (0: create only) with 412 Precondition Failed, as GCS
  does; gcsfs's create-only write (the workdir lock) relies on it.
"""

from __future__ import annotations

from http import HTTPStatus
import sys

from gcp_storage_emulator import __main__ as emulator_main
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_DOWNLOAD, _INSERT = objects.download, objects.insert


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


if __name__ == "__main__":
  patch_handlers()
  emulator_main.main(sys.argv[1:])
