"""Per-domain validation loss and bits per byte.

bits/byte = (sum of token CE in nats) / ln 2 / (UTF-8 bytes those tokens encode),
so it compares across vocabularies. Byte counts come from a per-token table.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax.parallel import sharding as shd
from cpt_jax.train import loss as loss_lib


def token_byte_lengths(vocab: Any, size: int) -> np.ndarray:
  """[size] UTF-8 bytes each token id stands for (0 for pad/eos/control ids)."""
  out = np.zeros((size,), np.float32)
  if hasattr(vocab, "decode") and not hasattr(vocab, "_sp"):  # tokenizer.json
    for i in range(min(size, vocab.vocab_size)):
      out[i] = len(vocab.decode([i]).encode("utf-8"))
    return out
  sp = getattr(vocab, "_sp", None)
  if sp is None:  # byte vocabulary: ids 3..258 are the bytes 0..255
    out[3:min(size, 259)] = 1.0
    return out
  byte_piece = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
  for i in range(min(size, sp.get_piece_size())):
    if sp.is_control(i) or sp.is_unknown(i):
      continue
    piece = sp.id_to_piece(i)
    out[i] = 1.0 if byte_piece.match(piece) else len(piece.replace("\u2581", " ").encode("utf-8"))
  return out


def make_eval_step(apply_fn: Callable, byte_lengths_V: np.ndarray, mesh, rules) -> Callable:
  """eval_step(params, batch) -> {'ce_sum', 'tokens', 'bytes'} summed over the batch."""
  table = jnp.asarray(byte_lengths_V)

  def step(params, batch):
    logits = apply_fn(params, batch["inputs"], batch["segment_ids"], batch["positions"])
    ce_BxL, _ = loss_lib.cross_entropy(logits, batch["targets"])
    w_BxL = batch["loss_weights"].astype(jnp.float32)
    return {"ce_sum": jnp.sum(ce_BxL * w_BxL), "tokens": jnp.sum(w_BxL),
            "bytes": jnp.sum(table[batch["targets"]] * w_BxL)}

  jitted = jax.jit(step)

  def run(params, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(params, batch)

  return run


def evaluate_domains(eval_step: Callable, params: Any, pipeline: Any, domains: Iterable[str],
                     batch_size: int, max_batches: int, mesh) -> dict[str, dict[str, float]]:
  """{domain: {'loss', 'bpb', 'tokens'}} over each domain's validation rows."""
  out = {}
  for d in domains:
    ce = tok = byt = 0.0
    max_rows = max_batches * batch_size if max_batches > 0 else None
    for local in pipeline.eval_batches(d, batch_size, max_rows=max_rows):
      m = jax.device_get(eval_step(params, shd.global_batch(local, mesh)))
      ce, tok, byt = ce + float(m["ce_sum"]), tok + float(m["tokens"]), byt + float(m["bytes"])
    out[d] = {"loss": ce / max(tok, 1.0), "bpb": ce / math.log(2) / max(byt, 1.0),
              "tokens": tok}
  return out
