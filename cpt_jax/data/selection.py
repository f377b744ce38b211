"""A replay selection on disk: which packed rows of which replay domain to replay.

    <dir>/selection.jsonl   one {"domain", "row", "score"} per selected row
    <dir>/meta.json         strategy, budget, plan, FLOPs/seconds, and per domain
                            the packed store it indexes (`stores`: folder name,
                            which embeds the store's cache key)

`row` is the row index inside the domain's packed training store. The data
pipeline reads a selection through `data.replay_selection=<dir>` and trains
the replay role on the selected rows only, so a later run can reuse it.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from cpt_jax import paths

SELECTION_FILE = "selection.jsonl"
META_FILE = "meta.json"


def selection_dir(workdir: str) -> str:
  return os.path.join(workdir, "replay_selection")


def write_selection(out_dir: str, rows: Mapping[str, np.ndarray],
                    scores: Mapping[str, np.ndarray] | None, meta: dict) -> str:
  """Writes selection.jsonl (rows sorted per domain) and meta.json atomically; returns out_dir."""
  paths.as_path(out_dir).mkdir(parents=True, exist_ok=True)
  lines = []
  for d in sorted(rows):
    r = np.asarray(rows[d], np.int64)
    s = np.asarray(scores[d], np.float64) if scores and d in scores else np.full(r.size, np.nan)
    order = np.argsort(r, kind="stable")
    for i in order:
      lines.append(json.dumps({"domain": d, "row": int(r[i]),
                               "score": None if not np.isfinite(s[i]) else float(s[i])}) + "\n")
  paths.write_atomic(os.path.join(out_dir, SELECTION_FILE), "".join(lines))
  meta = dict(meta, rows_per_domain={d: int(np.size(rows[d])) for d in sorted(rows)})
  paths.write_atomic(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=2))
  return out_dir


def read_selection(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """({domain: sorted row ids}, meta) from a selection folder or its selection.jsonl."""
  given = paths.as_path(path)
  folder = given if given.is_dir() else given.parent
  file = given / SELECTION_FILE if given.is_dir() else given
  if not file.is_file():
    raise FileNotFoundError(f"data.replay_selection={path!r}: no {SELECTION_FILE} there")
  rows: dict[str, list[int]] = {}
  for line in file.read_text().splitlines():
    if line.strip():
      rec = json.loads(line)
      rows.setdefault(rec["domain"], []).append(int(rec["row"]))
  meta = {}
  if (folder / META_FILE).is_file():
    meta = json.loads((folder / META_FILE).read_text())
  return {d: np.unique(np.asarray(r, np.int64)) for d, r in rows.items()}, meta


def check_stores(meta: dict, store_names: Mapping[str, str], path: str) -> None:
  """Errors when a selection indexes a different packed store than the run's."""
  for d, name in (meta.get("stores") or {}).items():
    if d in store_names and store_names[d] != name:
      raise ValueError(
          f"data.replay_selection={path!r} indexes rows of store {name!r} for domain {d!r}, "
          f"but this run packs it as {store_names[d]!r} (different corpus files, vocab or "
          "seq_len); select again")
