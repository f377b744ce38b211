"""Deprecated config keys: kept in the schema for one release, moved to their new keys.

A deprecated key stays in its group's defaults with the value `UNSET`, so old
config files and command-line overrides (`--config.replay.budget=0.01`) still
parse. Validation moves a set one into its new key in place (`move`), with a
DeprecationWarning and a printed line, and resets it to `UNSET`, so validating
the same config twice is a no-op. Setting a deprecated key and its new key is
an error naming both.
"""

from __future__ import annotations

import sys
from typing import Mapping
import warnings

UNSET = -1.0  # a deprecated key's default: not set

_printed: set[str] = set()  # notices already printed by this process


def notice(message: str) -> None:
  """A DeprecationWarning, and the same line on stderr (once per process)."""
  warnings.warn(message, DeprecationWarning, stacklevel=4)
  if message not in _printed:
    _printed.add(message)
    print(f"[cpt_jax] warning: {message}", file=sys.stderr, flush=True)


def move(cfg, where: str, old: str, new: str, defaults: Mapping[str, float],
         message: str) -> None:
  """cfg[new] = cfg[old] and cfg[old] = UNSET, in place; announces `message`.

  `defaults`: the new keys that replace `old`, with their defaults; any of them
  off its default is an error naming it and `where.old`.
  """
  clash = [f"{where}.{k}={cfg[k]}" for k, v in defaults.items() if cfg[k] != v]
  if clash:
    raise ValueError(f"{where}.{old}={cfg[old]} (deprecated) and {' / '.join(clash)} are "
                     f"both set; set only {where}.{new}")
  cfg[new] = cfg[old]
  cfg[old] = UNSET
  notice(message)
