"""The `config.data` group: defaults, domain/role resolution and validation."""

from __future__ import annotations

import fnmatch
import math
from typing import Mapping, Sequence

import ml_collections
import numpy as np

from cpt_jax import batch as batch_lib
from cpt_jax import paths

SOURCES = ("jsonl", "text", "tfrecord", "tfds")
ON_BAD_LINE = ("error", "skip")
ADD_BOS = ("auto", "yes", "no")


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the `config.data` group with a comment on every field."""
  c = ml_collections.ConfigDict()
  # Where documents come from: 'jsonl' | 'text' | 'tfrecord' | 'tfds'.
  # jsonl: <corpus_dir>/<domain>/{train,validation}.jsonl ({"id","text"} lines).
  # text: <corpus_dir>/<domain>/{train,validation}.txt (one document per line).
  # tfrecord: <corpus_dir>/<domain>/{train,validation}.tfrecord* (tf.Example).
  # tfds: every domain name is a TFDS dataset name (e.g. 'imdb_reviews').
  c.source = "jsonl"
  # Corpus root; '' -> $CPT_CORPORA, else <repo>/../shared/corpora.
  c.corpus_dir = ""
  # Roles: comma-separated domain names or glob patterns. Explicit names win
  # over patterns; a pattern only takes domains no other field claims
  # (replay='*' = every domain not named elsewhere). Patterns need a folder
  # corpus (not tfds).
  c.new = ""  # T: cross-entropy on its train split.
  c.replay = ""  # D with data: cross-entropy on its train split.
  c.distill = ""  # D without train data: its validation rows, KL to teacher.
  c.eval = ""  # Evaluation only; never in a training batch.
  # Mixture weights: '' = proportional to each domain's packed rows, else
  # 'name=w,pattern=w,...' (first matching key wins; every trainable domain
  # must match a key). Changeable at any step via pipeline.set_weights.
  c.weights = ""
  # 'byte' (seqio.ByteVocabulary, no download), a SentencePiece .model path or
  # a Hugging Face tokenizer.json path (train.init_from_hf sets the model's own).
  c.vocab = "byte"
  # Start each document (each packed row piece) with the vocabulary's BOS as
  # the model was trained: 'auto' = when its tokenizer adds one (HF
  # tokenizer_config.json / post-processor, a SentencePiece BOS piece), else
  # token 0 (the byte vocabulary, as seqio); 'yes' = BOS, an error without one;
  # 'no' = token 0.
  c.add_bos = "auto"
  # Packed row length L (tokens per row).
  c.seq_len = 256
  # Append EOS to every document before packing.
  c.append_eos = True
  # Seed of the mixer (domain choice per row) and of per-epoch row shuffles.
  c.seed = 0
  # Batches prepared ahead in a background thread; 0 = synchronous.
  c.prefetch = 4
  # Malformed JSON / invalid UTF-8 line: 'error' (names file:line) | 'skip'.
  c.on_bad_line = "error"
  # Packed-row cache; '' -> <workdir>/data_cache, else <tmp>/cpt_jax_data_cache.
  c.cache_dir = ""
  # Rows per store shard (a file of rows_Rx3xL int32 plus its row token counts);
  # part of the cache key.
  c.shard_rows = 16384
  # Tokens packed at once while building a store: bounds the builder's memory
  # (about 110 bytes per token) whatever the corpus size; the rows do not depend on it.
  c.build_buffer_tokens = 1 << 20
  # With several processes, process 0 builds every store into cache_dir (which
  # every process must see: a shared folder or bucket) and the others wait for
  # it to be published; True = every process builds its own copy (a host-local
  # cache_dir).
  c.build_on_every_process = False
  # How long a process other than 0 waits for a store to be published (seconds).
  c.store_wait_seconds = 3600.0
  # Fraction of each domain's validation rows (the tail) kept for evaluation
  # only; distill-role training uses the rest, so distilled domains are never
  # evaluated on rows they were distilled on. 0 = evaluate on every row.
  c.eval_holdout = 0.5
  # Keep at most this many documents per domain and split (0 = all).
  c.max_docs = 0
  # Replay selection (cpt_jax/replay): a selection folder or selection.jsonl;
  # replay domains then train only on the selected rows ('' = all rows).
  c.replay_selection = ""
  # Registered seqio Tasks as domains: comma-separated names or regexes (full
  # match); each matching Task is a domain named after it, its tokenised
  # 'targets' packed into a store. Roles come from data.new/replay/... as for
  # any domain (names or globs).
  c.seqio_tasks = ""
  # A registered seqio Mixture: its Tasks are domains (role 'new' unless a role
  # field names them) and its rates their initial weights (data.weights entries
  # come first and override); the rate controllers then update them.
  c.seqio_mixture = ""
  # tf.Example / TFDS feature holding the document text.
  c.text_feature = "text"
  c.tfds_data_dir = ""  # TFDS only: data_dir ('' = TFDS default).
  c.tfds_train_split = "train"  # TFDS only: the split of the train rows.
  c.tfds_validation_split = "validation"  # TFDS only: the split of the validation rows.
  return c


def add_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the `data` group to `config` (in place) and returns `config`."""
  config.data = default_data_config()
  return config


def _err(key: str, msg: str) -> ValueError:
  return ValueError(f"data.{key}: {msg}")


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
  """Checks field values that need no corpus; raises ValueError naming the key."""
  if cfg.source not in SOURCES:
    raise _err("source", f"{cfg.source!r} is not one of {SOURCES}")
  if cfg.on_bad_line not in ON_BAD_LINE:
    raise _err("on_bad_line", f"{cfg.on_bad_line!r} is not one of {ON_BAD_LINE}")
  if not isinstance(cfg.seq_len, int) or cfg.seq_len < 1:
    raise _err("seq_len", f"must be a positive int, got {cfg.seq_len!r}")
  if not isinstance(cfg.prefetch, int) or cfg.prefetch < 0:
    raise _err("prefetch", f"must be an int >= 0, got {cfg.prefetch!r}")
  if not 0.0 <= float(cfg.eval_holdout) < 1.0:
    raise _err("eval_holdout", f"must be in [0, 1), got {cfg.eval_holdout!r}")
  if not isinstance(cfg.max_docs, int) or cfg.max_docs < 0:
    raise _err("max_docs", f"must be an int >= 0, got {cfg.max_docs!r}")
  for key in ("shard_rows", "build_buffer_tokens"):
    if not isinstance(cfg.get(key, 1), int) or cfg.get(key, 1) < 1:
      raise _err(key, f"must be a positive int, got {cfg.get(key)!r}")
  if not float(cfg.get("store_wait_seconds", 1.0)) > 0:
    raise _err("store_wait_seconds", f"must be > 0, got {cfg.store_wait_seconds!r}")
  if cfg.vocab != "byte" and not paths.as_path(cfg.vocab).is_file():
    raise _err("vocab", f"'byte' or an existing SentencePiece model file, got {cfg.vocab!r}")
  if cfg.get("add_bos", "auto") not in ADD_BOS:
    raise _err("add_bos", f"{cfg.add_bos!r} is not one of {ADD_BOS}")
  if (not any(split_list(cfg[r]) for r in ("new", "replay", "distill"))
      and not cfg.get("seqio_mixture", "")):
    raise _err("new", "no training domain: set data.new, data.replay or data.distill")
  parse_weights(cfg.weights)  # syntax only


def split_list(s: str) -> list[str]:
  """'a, b,,c' -> ['a', 'b', 'c']."""
  return [t.strip() for t in (s or "").split(",") if t.strip()]


def is_pattern(name: str) -> bool:
  return any(ch in name for ch in "*?[")


def resolve_roles(cfg: ml_collections.ConfigDict, available: Sequence[str] | None,
                  default_new: Sequence[str] = ()) -> dict[str, str]:
  """Maps every domain of the run to its role.

  Args:
    cfg: the data config.
    available: domain names in the corpus (None when the source cannot list
      them, e.g. tfds: then patterns are an error).
    default_new: domains that take role 'new' when no role field claims them
      (a seqio Mixture's Tasks).
  Returns:
    {domain: role}; explicit names first, then patterns in role order.
  """
  out: dict[str, str] = {}
  for role in batch_lib.ROLES:
    for name in split_list(cfg[role]):
      if is_pattern(name):
        continue
      if name in out and out[name] != role:
        raise _err(role, f"domain {name!r} also listed in data.{out[name]}")
      out[name] = role
  for role in batch_lib.ROLES:
    for pat in split_list(cfg[role]):
      if not is_pattern(pat):
        continue
      if available is None:
        raise _err(role, f"pattern {pat!r} needs a folder corpus, not source={cfg.source!r}")
      for name in available:
        if name not in out and fnmatch.fnmatchcase(name, pat):
          out[name] = role
  for name in default_new:
    out.setdefault(name, "new")
  if not out:
    raise _err("new", "no domain selected by data.new/replay/distill/eval")
  return out


def parse_name_weights(spec: str, err, where: str = "") -> list[tuple[str, float]]:
  """'a=1,b*=0.5' -> [('a', 1.0), ('b*', 0.5)]; `err(msg)` builds the error to raise.

  Shared by `data.weights` and the rate controllers' `mixing.schedule` stages;
  `where` (e.g. ' at step 100') is added to messages.
  """
  out = []
  for item in split_list(spec):
    if "=" not in item:
      raise err(f"item {item!r}{where} is not name=weight")
    k, v = item.rsplit("=", 1)
    try:
      w = float(v)
    except ValueError:
      raise err(f"weight of {k.strip()!r}{where} is not a number: {v!r}") from None
    out.append((k.strip(), w))
  return out


def parse_weights(spec: str) -> list[tuple[str, float]]:
  """'a=1,b*=0.5' -> [('a', 1.0), ('b*', 0.5)]; raises naming data.weights."""
  return parse_name_weights(spec, lambda msg: _err("weights", msg))


def weights_from_spec(spec: str, domains: Sequence[str], roles: Sequence[str],
                      sizes: Sequence[int]) -> np.ndarray:
  """Per-domain weight vector from the config string ('' = by size)."""
  trainable = np.array([r != "eval" for r in roles])
  if not (spec or "").strip():
    w = np.where(trainable, np.asarray(sizes, np.float64), 0.0)
    return check_weights(w, domains, roles)
  items = parse_weights(spec)
  w = np.zeros(len(domains), np.float64)
  used = [False] * len(items)
  for i, d in enumerate(domains):
    for j, (k, v) in enumerate(items):
      if k == d or (is_pattern(k) and fnmatch.fnmatchcase(d, k)):
        used[j] = True
        w[i] = v if trainable[i] else (v if k == d else 0.0)
        break
    else:
      if trainable[i]:
        raise _err("weights", f"no weight for domain {d!r} (add {d}=w or *=w)")
  for (k, _), u in zip(items, used):
    if not u:
      raise _err("weights", f"{k!r} matches no domain of the run")
  return check_weights(w, domains, roles)


def check_weights(w: np.ndarray | Mapping[str, float], domains: Sequence[str],
                  roles: Sequence[str]) -> np.ndarray:
  """Validates a weight vector: finite, >= 0, sum > 0, eval domains at 0."""
  w = np.asarray(w, np.float64)
  if w.shape != (len(domains),):
    raise _err("weights", f"expected {len(domains)} weights, got shape {w.shape}")
  for i, (d, r) in enumerate(zip(domains, roles)):
    if not math.isfinite(w[i]):
      raise _err("weights", f"weight of domain {d!r} is not finite: {w[i]}")
    if w[i] < 0:
      raise _err("weights", f"weight of domain {d!r} is negative: {w[i]}")
    if r == "eval" and w[i] != 0:
      raise _err("weights", f"domain {d!r} has role eval and must have weight 0, got {w[i]}")
  if not w.sum() > 0:
    raise _err("weights", f"weights sum to {w.sum()}; at least one training domain needs weight > 0")
  return w
