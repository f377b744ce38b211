"""Prints constraints.txt: the installed version of every package cpt_jax's install needs.

  python .ci/constraints.py > constraints.txt      (after the suite passed in this environment)

Walks the requirements of cpt_jax and its extras (default: every extra in pyproject.toml)
through the installed distributions' metadata, markers evaluated for this interpreter, and
pins each one reached at its installed version. A local version label (torch's `+cpu`) is
dropped: `torch==2.13.0` admits the CPU and the CUDA build of the same release.
"""

import argparse
import importlib.metadata
import pathlib
import re
import sys
import tomllib

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]


def canonical(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def _wanted(req, extras):
  if req.marker is None:
    return True
  return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def closure(requirements):
  """{canonical name: installed version} of `requirements` and everything they need."""
  pins, seen = {}, set()
  todo = [Requirement(r) for r in requirements]
  while todo:
    req = todo.pop()
    name = canonical(req.name)
    key = (name, frozenset(req.extras))
    if key in seen:
      continue
    seen.add(key)
    try:
      dist = importlib.metadata.distribution(req.name)
    except importlib.metadata.PackageNotFoundError:
      sys.exit(f"{req.name} (needed: {req}) is not installed here; install cpt_jax with the "
               f"extras first, run the suite, then pin")
    pins[name] = dist.version.split("+")[0]
    for line in dist.requires or ():
      sub = Requirement(line)
      if _wanted(sub, set(req.extras)):
        todo.append(Requirement(f"{sub.name}[{','.join(sub.extras)}]" if sub.extras
                                else sub.name))
  return pins


def main(argv):
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  extras = project["optional-dependencies"]
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--extras", default=",".join(extras),
                      help=f"comma-separated extras (default: all, {','.join(extras)})")
  args = parser.parse_args(argv)
  wanted = [e for e in args.extras.split(",") if e]
  unknown = set(wanted) - set(extras)
  if unknown:
    parser.error(f"--extras: {sorted(unknown)} not in pyproject.toml ({sorted(extras)})")
  reqs = list(project["dependencies"]) + [r for e in wanted for r in extras[e]]
  pins = closure(reqs)
  print(f"# cpt_jax[{','.join(wanted)}]: the versions the suite last passed with, Python "
        f"{sys.version_info.major}.{sys.version_info.minor}, {sys.platform}.")
  print("# Regenerate: python .ci/constraints.py > constraints.txt (in the green environment).")
  for name in sorted(pins):
    print(f"{name}=={pins[name]}")


if __name__ == "__main__":
  main(sys.argv[1:])
