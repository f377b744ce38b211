"""The batch contract between the data pipeline and the train step.

Every batch the train step sees is a dict of numpy/jax arrays with these keys
(shapes in the letters below):

  inputs        int32   [B, L]  token ids fed to the model (shifted targets)
  targets       int32   [B, L]  next-token targets
  segment_ids   int32   [B, L]  1, 2, ... per packed document; 0 marks padding
  positions     int32   [B, L]  position of each token inside its document
  loss_weights  float32 [B, L]  1.0 where the target counts, 0.0 on padding
  domain_ids    int32   [B]     index of the row's domain in the run's domain list
  roles         int32   [B]     one of ROLE_IDS: what the row is for in the objective

Roles (see the continued pre-training objective):
  new      rows of the new dataset T: cross-entropy
  replay   rows of old domains D whose data is available: cross-entropy
  distill  rows of old domains whose training data is unavailable: KL to the teacher
  eval     evaluation only; never in a training batch

Shape letters, one table for the whole package. An array's name ends in one
capital letter per axis joined by 'x' (`logits_BxLxV` is [B, L, V]), and
docstrings write shapes as [B, L, V] with the same letters. A digit is a
literal size (`planes_3xBxL`, `mask_Bx1x1xLxL`); a size derived from the
letters is written out (`angles_BxLxHalf`: E / 2; [H*E, D]; Vp: V padded).
Each letter has one meaning:

  B  batch rows (the global batch, or this process's slice of it)
  L  positions in a row (seq_len)
  V  vocabulary
  D  model width (d_model): hidden states, and a row's pooled hidden state
  H  query heads
  K  key/value heads
  G  query heads per key/value head (H / K)
  E  head width (head_dim)
  F  MLP width (mlp_dim)
  A  microbatches (gradient accumulation)
  N  a subset of rows: teacher rows, scored candidates, selected rows
  R  rows of a packed store (what the packer writes)
  O  documents
  P  pieces (a document cut into pieces of at most L tokens)
  T  flat tokens (documents laid end to end)
  C  domains of the run
  U  groups a reduction sums rows into (domains or roles)
  S  stages
  J  top-k entries (the teacher's k most likely tokens)
  X  any further axes (`x_BxX` is [B, ...])

In prose a capital may name a thing rather than an axis (the new dataset T,
old domains D, `q_T`): only a suffix or a bracketed shape uses the table.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

ROLES = ("new", "replay", "distill", "eval")
ROLE_IDS = {name: i for i, name in enumerate(ROLES)}
NEW, REPLAY, DISTILL, EVAL = (ROLE_IDS[r] for r in ROLES)

TOKEN_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")
ROW_FIELDS = ("domain_ids", "roles")
FIELDS = TOKEN_FIELDS + ROW_FIELDS

FIELD_DTYPES = {
    "inputs": np.int32,
    "targets": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "loss_weights": np.float32,
    "domain_ids": np.int32,
    "roles": np.int32,
}


def role_id(name: str) -> int:
  """Maps a role name to its integer id, with a clear error."""
  if name not in ROLE_IDS:
    raise ValueError(f"unknown role {name!r}; expected one of {ROLES}")
  return ROLE_IDS[name]


def check_batch(batch: Mapping[str, np.ndarray], seq_len: int | None = None) -> None:
  """Raises ValueError when `batch` breaks the contract above."""
  missing = [k for k in FIELDS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing fields {missing}; has {sorted(batch)}")
  b, l = np.shape(batch["inputs"])
  if seq_len is not None and l != seq_len:
    raise ValueError(f"batch rows have length {l}, config says {seq_len}")
  for k in TOKEN_FIELDS:
    if np.shape(batch[k]) != (b, l):
      raise ValueError(f"batch[{k!r}] has shape {np.shape(batch[k])}, expected {(b, l)}")
  for k in ROW_FIELDS:
    if np.shape(batch[k]) != (b,):
      raise ValueError(f"batch[{k!r}] has shape {np.shape(batch[k])}, expected {(b,)}")


def pack_documents(
    docs: list[np.ndarray],
    seq_len: int,
    domain_id: int = 0,
    role: int = NEW,
) -> dict[str, np.ndarray]:
  """Greedily packs token arrays into rows of `seq_len` (reference packer).

  Each document becomes `inputs = [0] + doc[:-1]` / `targets = doc`; a document
  longer than a row is split into row-sized pieces (never dropped), and each
  piece restarts its positions at 0. Used by tests and synthetic data; the data
  pipeline has a vectorised packer with the same output.
  """
  rows: list[dict[str, list]] = []
  cur = None

  def new_row():
    return {k: [] for k in TOKEN_FIELDS} | {"_seg": 0}

  pieces = []
  for doc in docs:
    doc = np.asarray(doc, np.int32)
    for start in range(0, len(doc), seq_len):
      pieces.append(doc[start:start + seq_len])
  for piece in pieces:
    if cur is None or len(cur["inputs"]) + len(piece) > seq_len:
      if cur is not None:
        rows.append(cur)
      cur = new_row()
    cur["_seg"] += 1
    n = len(piece)
    cur["inputs"] += [0] + piece[:-1].tolist()
    cur["targets"] += piece.tolist()
    cur["segment_ids"] += [cur["_seg"]] * n
    cur["positions"] += list(range(n))
    cur["loss_weights"] += [1.0] * n
  if cur is not None:
    rows.append(cur)
  out = {k: np.zeros((len(rows), seq_len), FIELD_DTYPES[k]) for k in TOKEN_FIELDS}
  for i, r in enumerate(rows):
    n = len(r["inputs"])
    for k in TOKEN_FIELDS:
      out[k][i, :n] = r[k]
  out["domain_ids"] = np.full((len(rows),), domain_id, np.int32)
  out["roles"] = np.full((len(rows),), role, np.int32)
  return out


def synthetic_batch(
    rng: np.random.Generator,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    num_domains: int = 1,
    roles: tuple[int, ...] = (NEW,),
    docs_per_row: int = 2,
) -> dict[str, np.ndarray]:
  """A random packed batch honouring the contract (tests and benchmarks)."""
  out = {k: np.zeros((batch_size, seq_len), FIELD_DTYPES[k]) for k in TOKEN_FIELDS}
  for i in range(batch_size):
    cuts = np.sort(rng.choice(np.arange(1, seq_len), docs_per_row - 1, replace=False)) \
        if docs_per_row > 1 else np.array([], np.int64)
    bounds = [0, *cuts.tolist(), seq_len]
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
      toks = rng.integers(1, vocab_size, size=b - a, dtype=np.int32)
      out["targets"][i, a:b] = toks
      out["inputs"][i, a:b] = np.concatenate([[0], toks[:-1]])
      out["segment_ids"][i, a:b] = s + 1
      out["positions"][i, a:b] = np.arange(b - a)
      out["loss_weights"][i, a:b] = 1.0
  out["domain_ids"] = rng.integers(0, num_domains, size=batch_size, dtype=np.int32)
  out["roles"] = np.asarray(roles, np.int32)[np.arange(batch_size) % len(roles)]
  return out
