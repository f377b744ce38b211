"""Vectorised greedy packer; output equals `cpt_jax.batch.pack_documents`.

Packed rows are stored as three int32 planes (targets, segment_ids, positions);
`inputs` and `loss_weights` are derived per batch by `rows_to_batch`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cpt_jax import batch as batch_lib

TARGETS, SEGMENT_IDS, POSITIONS = 0, 1, 2


def pack_flat(flat_T: np.ndarray, lengths_O: np.ndarray, seq_len: int) -> np.ndarray:
  """Packs O documents (concatenated in flat_T) into R rows.

  Documents longer than seq_len are split into seq_len pieces (never dropped);
  pieces fill rows greedily in order, a new row starting when the next piece
  does not fit.

  Returns:
    planes_3xRxL int32: targets, segment_ids (1.. per piece, 0 = pad), positions.
  """
  L = int(seq_len)
  lengths_O = np.asarray(lengths_O, np.int64)
  flat_T = np.asarray(flat_T, np.int32)
  if lengths_O.sum() != flat_T.size:
    raise ValueError(f"lengths sum to {lengths_O.sum()} but there are {flat_T.size} tokens")
  # Pieces: ceil(n / L) per document.
  npieces_O = -(-lengths_O // L)
  P = int(npieces_O.sum())
  if P == 0:
    return np.zeros((3, 0, L), np.int32)
  doc_P = np.repeat(np.arange(lengths_O.size), npieces_O)
  first_P = np.repeat(np.cumsum(npieces_O) - npieces_O, npieces_O)
  k_P = np.arange(P) - first_P
  doc_start_O = np.cumsum(lengths_O) - lengths_O
  plen_P = np.minimum(L, lengths_O[doc_P] - k_P * L)
  src_P = doc_start_O[doc_P] + k_P * L  # == exclusive cumsum of plen_P
  # Greedy row starts: the next row begins at the first piece past L tokens.
  cum = np.concatenate([[0], np.cumsum(plen_P)])
  starts = []
  i = 0
  while i < P:
    starts.append(i)
    i = int(np.searchsorted(cum, cum[i] + L, side="right")) - 1
  starts_R = np.asarray(starts, np.int64)
  R = starts_R.size
  row_P = np.repeat(np.arange(R), np.diff(np.append(starts_R, P)))
  seg_P = np.arange(P) - starts_R[row_P] + 1
  off_P = cum[:-1] - cum[starts_R[row_P]]
  # Scatter tokens.
  planes = np.zeros((3, R, L), np.int32)
  dest_T = np.repeat(row_P * L + off_P - src_P, plen_P) + np.arange(flat_T.size)
  planes[TARGETS].reshape(-1)[dest_T] = flat_T
  planes[SEGMENT_IDS].reshape(-1)[dest_T] = np.repeat(seg_P, plen_P)
  planes[POSITIONS].reshape(-1)[dest_T] = np.arange(flat_T.size) - np.repeat(src_P, plen_P)
  return planes


def rows_to_batch(planes_3xBxL: np.ndarray, domain_ids_B: np.ndarray,
                  roles_B: np.ndarray, start_id: int = 0) -> dict[str, np.ndarray]:
  """Stored row planes -> a batch dict per cpt_jax/batch.py.

  The input at the start of each row piece (position 0) is `start_id`: the
  vocabulary's BOS (`cpt_jax.data.vocab.start_id`, `data.add_bos`), so a document
  reads [BOS, t1 .. tn] -> [t1 .. tn, EOS] as its tokenizer encodes it with
  special tokens; 0 (seqio's pad) for the byte vocabulary.
  """
  targets_BxL = np.ascontiguousarray(planes_3xBxL[TARGETS], np.int32)
  seg_BxL = np.ascontiguousarray(planes_3xBxL[SEGMENT_IDS], np.int32)
  pos_BxL = np.ascontiguousarray(planes_3xBxL[POSITIONS], np.int32)
  inputs_BxL = np.zeros_like(targets_BxL)
  inputs_BxL[:, 1:] = targets_BxL[:, :-1]
  inputs_BxL[pos_BxL == 0] = 0
  inputs_BxL[(pos_BxL == 0) & (seg_BxL > 0)] = start_id
  return {
      "inputs": inputs_BxL,
      "targets": targets_BxL,
      "segment_ids": seg_BxL,
      "positions": pos_BxL,
      "loss_weights": (seg_BxL > 0).astype(np.float32),
      "domain_ids": np.asarray(domain_ids_B, np.int32),
      "roles": np.asarray(roles_B, np.int32),
  }


def pack_documents(docs: Sequence[np.ndarray], seq_len: int, domain_id: int = 0,
                   role: int = batch_lib.NEW) -> dict[str, np.ndarray]:
  """Drop-in vectorised twin of `cpt_jax.batch.pack_documents`."""
  lengths_O = np.array([len(d) for d in docs], np.int64)
  flat_T = (np.concatenate([np.asarray(d, np.int32) for d in docs])
            if len(docs) else np.zeros((0,), np.int32))
  planes = pack_flat(flat_T, lengths_O, seq_len)
  n = planes.shape[1]
  return rows_to_batch(planes, np.full((n,), domain_id), np.full((n,), role))


class StreamPacker:
  """`pack_flat` over a stream of documents with a bounded buffer; same rows.

  Documents go in with `add`; `take` packs the buffered tokens and returns
  every row that can no longer change (all but the last, whose space later
  documents may fill), keeping the last row's pieces buffered for the next
  call; `take(final=True)` returns the rest. The rows of all calls, in order,
  equal `pack_flat` of the whole stream: greedy packing decides a row's end
  from the pieces up to the first that does not fit, and a carried piece
  starts at a multiple of L inside its document, so it splits the same way.
  """

  def __init__(self, seq_len: int):
    self.seq_len = int(seq_len)
    self._flats: list[np.ndarray] = []
    self._lens: list[np.ndarray] = []
    self.pending_tokens = 0

  def add(self, flat_T: np.ndarray, lengths_O: np.ndarray) -> None:
    """Buffers O documents (their tokens concatenated in flat_T)."""
    self._flats.append(np.asarray(flat_T, np.int32))
    self._lens.append(np.asarray(lengths_O, np.int64))
    self.pending_tokens += int(flat_T.size)

  def take(self, final: bool = False) -> np.ndarray:
    """Packed rows_Rx3xL (int32) that are complete; all of them when `final`."""
    if not self._flats:
      return np.zeros((0, 3, self.seq_len), np.int32)
    flat_T = np.concatenate(self._flats)
    lengths_O = np.concatenate(self._lens)
    self._flats, self._lens, self.pending_tokens = [], [], 0
    planes = pack_flat(flat_T, lengths_O, self.seq_len)
    if not final and planes.shape[1]:
      # Carry the last row's tokens: the tail of one document (from a piece
      # boundary) and the documents after it.
      t = int((planes[SEGMENT_IDS, -1] > 0).sum())
      start = flat_T.size - t
      ends_O = np.cumsum(lengths_O)
      j = int(np.searchsorted(ends_O, start, side="right"))
      lens = lengths_O[j:].copy()
      if lens.size:
        lens[0] = ends_O[j] - start
      self.add(flat_T[start:], lens)
      planes = planes[:, :-1]
    return np.ascontiguousarray(planes.transpose(1, 0, 2))
