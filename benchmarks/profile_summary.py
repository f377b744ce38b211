r"""Where a step's device time goes, read from a `jax.profiler` trace: time per kind of op
(matmuls, attention kernels, collectives, copies, other fusions) and the slowest ops.

  python benchmarks/profile_summary.py /tmp/trace        # a folder jax.profiler.trace wrote
  python benchmarks/throughput.py ... --profile /tmp/trace   # the same summary, under "profile"

Prints one JSON object:

  device_ops_seconds   summed time of the compiled program's ops on the device (on a CPU: the
                       XLA ops on the host's compute threads, which overlap)
  span_seconds         first op start to last op end; busy_fraction = ops / span (GPU: below 1
                       means the device waited, on the host or between launches)
  kinds                {kind: {"seconds", "share", "ops"}} over matmul, attention, collective,
                       copy_transpose, fusion, other
  top_ops              the `--top` ops by summed time: name, kind, seconds, count, share

Reads the trace with `jax.profiler.ProfileData` (no TensorBoard needed).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

import jax

KINDS = ("matmul", "attention", "collective", "copy_transpose", "fusion", "other")
# Patterns over an op's name, its string statistics (on a GPU: the kernel's name), and a
# custom call's target; the first that matches names the kind.
_PATTERNS = (
    ("attention", re.compile(r"fmha|flash|attention|splash", re.I)),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|"
                              r"collective-permute|nccl", re.I)),
    ("matmul", re.compile(r"gemm|cublas|^dot([._]|$)|convolution|matmul", re.I)),
    ("copy_transpose", re.compile(r"^(copy|transpose|dynamic-update-slice|dynamic-slice)"
                                  r"([._-]|$)|memcpy|memset", re.I)),
)
_MOVES = {"copy", "transpose", "bitcast", "parameter", "tuple", "get-tuple-element",
          "dynamic-slice", "dynamic-update-slice", "slice", "reshape", "broadcast",
          "concatenate", "constant", "pad"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def _match(texts) -> str | None:
  for kind, pattern in _PATTERNS:
    if any(pattern.search(t) for t in texts):
      return kind
  return None


def _opcode(rhs: str) -> str:
  """The opcode of an HLO instruction's right-hand side ('f32[2]{0} add(...)' -> 'add')."""
  i = 0
  if rhs.startswith("("):  # a tuple type: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rhs):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
  rest = rhs[i + 1:] if rhs.startswith("(") else rhs.split(" ", 1)[-1]
  return rest.strip().split("(", 1)[0]


def hlo_kinds(hlo_text: str) -> dict[str, str]:
  """{instruction name: kind} for every instruction of a compiled module's text
  (`compiled.as_text()`): a fusion takes the kind of what it computes (a dot inside makes
  it a matmul, only data movement a copy_transpose)."""
  comps: dict[str, list[tuple[str, str, str]]] = {}
  current = None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = comps.setdefault(m.group(1), [])
      continue
    if current is None or " = " not in line:
      continue
    lhs, rhs = line.strip().split(" = ", 1)
    name = lhs.replace("ROOT ", "").lstrip("%").strip()
    current.append((name, _opcode(rhs), rhs))
  memo: dict[str, str] = {}

  def kind(opcode: str, rhs: str) -> str:
    if opcode == "custom-call":
      target = _TARGET.search(rhs)
      return _match([target.group(1)] if target else []) or "other"
    if opcode in ("dot", "convolution"):
      return "matmul"
    if opcode in ("fusion", "call", "async-start"):
      called = _CALLS.search(rhs)
      return comp_kind(called.group(1)) if called else "fusion"
    return _match([opcode]) or ("copy_transpose" if opcode in _MOVES else "other")

  def comp_kind(comp: str) -> str:
    if comp not in memo:
      memo[comp] = "fusion"  # a guard against cycles; replaced below
      inner = [kind(op, rhs) for _, op, rhs in comps.get(comp, ())]
      found = next((k for k in ("attention", "matmul", "collective") if k in inner), None)
      moves_only = all(op in _MOVES for _, op, _ in comps.get(comp, ()))
      memo[comp] = found or ("copy_transpose" if moves_only else "fusion")
    return memo[comp]

  return {name: kind(op, rhs) for body in comps.values() for name, op, rhs in body}


def kind_of(name: str, texts: list[str], known: dict[str, str]) -> str:
  """The kind of one traced op: from the compiled module where it is known, else its name
  and string statistics."""
  if name in known:
    return known[name]
  found = _match([name]) or _match(texts)
  return found or ("fusion" if "fusion" in name else "other")


def _op_events(data: "jax.profiler.ProfileData"):
  """(name, start_ns, duration_ns, string stats) of each compiled-program op: a device
  plane's "XLA Ops" line where there is one (GPU, TPU), else host events with an `hlo_op`
  statistic (CPU)."""
  device_planes = [p for p in data.planes if p.name.startswith("/device:")]
  found = False
  for plane in device_planes:
    for line in plane.lines:
      if line.name != "XLA Ops":
        continue
      for e in line.events:
        found = True
        texts = [v for _, v in e.stats if isinstance(v, str)]
        yield e.name, e.start_ns, e.duration_ns, texts
  if found:
    return
  for plane in data.planes:
    for line in plane.lines:
      for e in line.events:
        stats = dict(e.stats)
        if "hlo_op" in stats:
          texts = [v for v in stats.values() if isinstance(v, str)]
          yield str(stats["hlo_op"]), e.start_ns, e.duration_ns, texts


def find_xplane(trace_dir: str) -> str:
  """The newest .xplane.pb under `trace_dir` (jax.profiler.trace writes
  plugins/profile/<time>/<host>.xplane.pb)."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"{trace_dir}: no *.xplane.pb under it (not a jax.profiler "
                            "trace folder?)")
  return files[-1]


def summarize(trace_dir: str, top: int = 15) -> dict:
  """The JSON object described in the module docstring, for the trace under `trace_dir`
  (with the compiled modules' text in `trace_dir/*.hlo.txt`, when written there, to tell
  a fusion's kind by what it computes)."""
  path = find_xplane(trace_dir)
  data = jax.profiler.ProfileData.from_file(path)
  known: dict[str, str] = {}
  for hlo in sorted(glob.glob(os.path.join(trace_dir, "*.hlo.txt"))):
    with open(hlo, encoding="utf-8") as f:
      known.update(hlo_kinds(f.read()))
  per_op = collections.defaultdict(lambda: [0.0, 0])  # (name less ".N", kind) -> [s, count]
  kinds = {k: [0.0, 0] for k in KINDS}
  first, last = None, None
  for name, start, dur, texts in _op_events(data):
    name = name.lstrip("%")
    kind = kind_of(name, texts, known)
    for entry in (per_op[(re.sub(r"\.\d+$", "", name), kind)], kinds[kind]):
      entry[0] += dur * 1e-9
      entry[1] += 1
    first = start if first is None else min(first, start)
    last = start + dur if last is None else max(last, start + dur)
  total = sum(v[0] for v in kinds.values())
  if not total:
    raise ValueError(f"{path}: the trace holds no compiled-program ops")
  span = (last - first) * 1e-9
  ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
  return {
      "xplane": path,
      "device_ops_seconds": total,
      "span_seconds": span,
      "busy_fraction": total / span if span else None,
      "kinds": {k: {"seconds": s, "share": s / total, "ops": n} for k, (s, n) in kinds.items()},
      "top_ops": [{"name": n, "kind": k, "seconds": s, "count": c, "share": s / total}
                  for (n, k), (s, c) in ranked],
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  ap.add_argument("trace_dir", help="the folder given to jax.profiler.trace")
  ap.add_argument("--top", type=int, default=15)
  args = ap.parse_args()
  print(json.dumps(summarize(args.trace_dir, args.top), indent=1))


if __name__ == "__main__":
  main()
