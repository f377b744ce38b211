"""The configs that ship with the package (ml_collections config files).

`python -m cpt_jax.main --config=NAME[:ARG]` (or the `cpt-jax` console script)
finds NAME here when it is not a file: `demo`, `demo.py` and `configs/demo.py`
all name `cpt_jax/configs/demo.py`, so every command of the README works after a
`pip install`, outside any checkout. In the checkout `configs/` points here.
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The packaged config names ('demo', 'llama3_2_1b', ...)."""
  return sorted(f[:-3] for f in os.listdir(DIR) if f.endswith(".py") and not f.startswith("_")
                and f != "recipe.py")


def resolve(spec: str) -> str:
  """'PATH[:ARG]' unchanged when PATH is a file, else the packaged config of that name."""
  path, sep, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  name = os.path.basename(path)
  name = name if name.endswith(".py") else name + ".py"
  packaged = os.path.join(DIR, name)
  if name[:-3] in names():
    return packaged + sep + arg
  return spec
