"""Forward-only, sharded, batched scoring of packed rows (and the look-ahead step).

`Scorer.stream(params, store, rows)` yields, batch by batch, each row's mean
token cross-entropy and its pooled final hidden state (mean over the row's
real tokens), so callers select with bounded memory; `Scorer.divergences`
gives each row's mean KL(reference || params) per token (two forwards a row).
Batches are global: every process feeds its slice and gets the whole batch's
scores back.
FLOPs are counted as rows x seq_len x forward FLOPs/token: `flops` over the
rows asked for (the selection's cost), `run_flops` over every row the device
ran (the padding of a partial last batch and the rate measurement included),
which is what a stage's budget counts.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from cpt_jax import batch as batch_lib
from cpt_jax.data import packing
from cpt_jax.model.transformer import flops_per_token
from cpt_jax.parallel import sharding as shd
from cpt_jax.train import loss as loss_lib
from cpt_jax.train import objective as objective_lib


def _masked_mean_ce(logits_BxLxV, batch):
  ce_BxL, _ = loss_lib.cross_entropy(logits_BxLxV, batch["targets"])
  w_BxL = batch["loss_weights"].astype(jnp.float32)
  return jnp.sum(ce_BxL * w_BxL) / jnp.maximum(jnp.sum(w_BxL), 1.0)


class Scorer:
  """Per-row loss and pooled hidden states of a model on packed rows."""

  def __init__(self, model, model_cfg, mesh, rules, batch_rows: int, seq_len: int,
               start_id: int = 0):
    """start_id: the input token at each row piece's start (the pipeline's `start_id`)."""
    self.model, self.mesh, self.rules = model, mesh, rules
    self.start_id = int(start_id)
    self.batch_rows, self.seq_len = int(batch_rows), int(seq_len)
    self.fwd_flops_tok = flops_per_token(model_cfg, seq_len, training=False)
    self.train_flops_tok = flops_per_token(model_cfg, seq_len, training=True)
    self.rows_scored = 0  # forward row-passes so far (rows asked for)
    self.rows_run = 0  # forward row-passes run (whole batches: padding included)
    self.extra_flops = 0.0  # look-ahead steps etc.
    self.measure_flops = 0.0  # the rate measurement's forwards
    self.seconds = 0.0
    if self.batch_rows % jax.process_count():
      raise ValueError(f"replay.score_batch={batch_rows} not divisible by the "
                       f"{jax.process_count()} processes")

    def fwd(params, batch):
      logits, hidden_BxLxD = model.apply({"params": params}, batch["inputs"],
                                         batch["segment_ids"], batch["positions"],
                                         return_hidden=True)
      ce_BxL, _ = loss_lib.cross_entropy(logits, batch["targets"])
      w_BxL = batch["loss_weights"].astype(jnp.float32)
      tok_B = jnp.sum(w_BxL, axis=-1)
      loss_B = loss_lib.row_sums(ce_BxL, w_BxL) / jnp.maximum(tok_B, 1.0)
      pooled_BxD = jnp.einsum("bld,bl->bd", hidden_BxLxD.astype(jnp.float32),
                              w_BxL) / jnp.maximum(tok_B, 1.0)[:, None]
      return loss_B, pooled_BxD

    self._fwd = jax.jit(fwd)

    def divergence(params, batch, ref_params, temperature):
      def logits(p):
        return model.apply({"params": p}, batch["inputs"], batch["segment_ids"],
                           batch["positions"])
      kl_BxL = objective_lib.kl_full(logits(ref_params), logits(params), temperature)
      w_BxL = batch["loss_weights"].astype(jnp.float32)
      return (loss_lib.row_sums(kl_BxL, w_BxL) / jnp.maximum(jnp.sum(w_BxL, axis=-1), 1.0),)

    self._divergence = jax.jit(divergence)

    def lookahead(params, batch, lr):
      g = jax.grad(lambda p: _masked_mean_ce(
          model.apply({"params": p}, batch["inputs"], batch["segment_ids"],
                      batch["positions"]), batch))(params)
      # Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g): the step training takes.
      return jax.tree.map(lambda p, gi: p - lr * jnp.sign(gi).astype(p.dtype), params, g)

    self._lookahead = jax.jit(lookahead)

  @property
  def flops(self) -> float:
    """The selection's FLOPs: rows asked for, plus look-ahead steps."""
    return self.rows_scored * self.seq_len * self.fwd_flops_tok + self.extra_flops

  @property
  def run_flops(self) -> float:
    """Every FLOP run: whole (padded) batches, look-ahead steps, rate measurement."""
    return (self.rows_run * self.seq_len * self.fwd_flops_tok + self.extra_flops
            + self.measure_flops)

  def padded(self, rows: int) -> int:
    """Rows run to score `rows` rows in one `stream` call (whole batches)."""
    return -(-int(rows) // self.batch_rows) * self.batch_rows

  def counters(self) -> dict[str, float]:
    """The counts that survive a restart (host state)."""
    return {"rows_scored": self.rows_scored, "rows_run": self.rows_run,
            "extra_flops": self.extra_flops, "measure_flops": self.measure_flops}

  def add_counters(self, state: dict) -> None:
    """Adds an earlier invocation's `counters()` (older checkpoints: rows_run = rows_scored)."""
    self.rows_scored += int(state.get("rows_scored", 0))
    self.rows_run += int(state.get("rows_run", state.get("rows_scored", 0)))
    self.extra_flops += float(state.get("extra_flops", 0.0))
    self.measure_flops += float(state.get("measure_flops", 0.0))

  def _run(self, fn, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return fn(*args)

  def _fetch(self, x):
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  def _local_batch(self, store, rows_B: np.ndarray) -> dict[str, np.ndarray]:
    """This process's slice of a global batch of `rows_B` (padded with empty rows)."""
    per = self.batch_rows // jax.process_count()
    lo = jax.process_index() * per
    idx = np.arange(lo, lo + per)
    planes = np.zeros((3, per, self.seq_len), np.int32)
    valid = idx < rows_B.size
    if valid.any():
      planes[:, valid] = store.gather(rows_B[idx[valid]])
    return packing.rows_to_batch(planes, np.zeros((per,), np.int32),
                                 np.full((per,), batch_lib.EVAL, np.int32), self.start_id)

  def map(self, fn, params: Any, store, rows: np.ndarray, *args, passes: int = 1
          ) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    """Yields (rows_B, fn's outputs for those rows) over `rows` of `store`, batch by batch.

    fn(params, batch, *args) -> a tuple of arrays with a leading row axis (jitted);
    `passes`: the forwards fn runs per row (what the counters add)."""
    rows = np.asarray(rows, np.int64)
    for start in range(0, rows.size, self.batch_rows):
      t0 = time.perf_counter()
      chunk = rows[start:start + self.batch_rows]
      batch = shd.global_batch(self._local_batch(store, chunk), self.mesh)
      out = tuple(self._fetch(x)[:chunk.size] for x in self._run(fn, params, batch, *args))
      self.rows_scored += passes * chunk.size
      self.rows_run += passes * self.batch_rows
      self.seconds += time.perf_counter() - t0
      yield chunk, out

  def stream(self, params: Any, store, rows: np.ndarray
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (rows_B, loss_B, pooled_BxD) over `rows` of `store`, batch by batch."""
    for chunk, (loss_B, pooled_BxD) in self.map(self._fwd, params, store, rows):
      yield chunk, loss_B.astype(np.float64), pooled_BxD

  def run_batch(self, fn, params: Any, local: dict[str, np.ndarray], *args
                ) -> tuple[np.ndarray, ...]:
    """fn(params, global batch of this process's `local` rows, *args) -> a tuple of arrays
    (jitted fn), fetched to every process; counts nothing (the caller adds its FLOPs to
    `extra_flops`)."""
    batch = shd.global_batch({k: local[k] for k in batch_lib.FIELDS}, self.mesh)
    return tuple(self._fetch(x) for x in self._run(fn, params, batch, *args))

  def losses(self, params: Any, store, rows: np.ndarray) -> np.ndarray:
    """Per-row mean loss of all `rows` (for small, bounded row sets)."""
    out = [l for _, l, _ in self.stream(params, store, rows)]
    return np.concatenate(out) if out else np.zeros((0,))

  def divergences(self, params: Any, ref_params: Any, store, rows: np.ndarray,
                  temperature: float = 1.0) -> np.ndarray:
    """Per-row mean over real tokens of KL(softmax(ref/T) || softmax(params/T)): [rows].

    Two forwards a row (both models), counted as two row-passes."""
    out = [kl_B for _, (kl_B,) in self.map(self._divergence, params, store, rows, ref_params,
                                           jnp.float32(temperature), passes=2)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0,))

  def lookahead(self, params: Any, batches: list[dict[str, np.ndarray]], lr: float) -> Any:
    """Params after one virtual sign-SGD step per batch (each a global-size local batch)."""
    t0 = time.perf_counter()
    for local in batches:
      batch = shd.global_batch({k: local[k] for k in batch_lib.FIELDS}, self.mesh)
      params = self._run(self._lookahead, params, batch, jnp.float32(lr))
      self.extra_flops += local["inputs"].shape[0] * jax.process_count() * self.seq_len \
          * self.train_flops_tok
    jax.block_until_ready(params)
    self.seconds += time.perf_counter() - t0
    return params

  def measure_rate(self, params: Any, store, rows: np.ndarray) -> float:
    """Forward FLOP/s of one scoring batch after compilation.

    Its two batches (compile, timed) are not selection (`flops`) but count in
    `measure_flops` / `run_flops`.
    """
    rows = np.asarray(rows, np.int64)[:self.batch_rows]
    if rows.size == 0:
      return 0.0
    n0, r0, s0 = self.rows_scored, self.rows_run, self.seconds
    for _ in self.stream(params, store, rows):  # compile
      pass
    t0 = time.perf_counter()
    for _ in self.stream(params, store, rows):
      pass
    dt = time.perf_counter() - t0
    self.measure_flops += (self.rows_run - r0) * self.seq_len * self.fwd_flops_tok
    self.rows_scored, self.rows_run, self.seconds = n0, r0, s0
    return self.batch_rows * self.seq_len * self.fwd_flops_tok / max(dt, 1e-9)
