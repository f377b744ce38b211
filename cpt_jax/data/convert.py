"""JSONL domain -> sharded TFRecord of tf.Example ('text', 'id' bytes features).

  python -m cpt_jax.data.convert --domain_dir CORPUS/man_en --out OUT/man_en --shards 4

Writes <out>/<split>.tfrecord-0000k-of-0000N for each split present. Shard k
holds a contiguous block of documents, so reading shards in order gives the
JSONL order (the packed rows are identical). Each shard is written to a
temporary file and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cpt_jax import tensorflow_cpu
from cpt_jax.data import sources as sources_lib


def convert_domain(domain_dir: str, out_dir: str, shards: int = 1,
                   on_bad_line: str = "error") -> list[str]:
  """Converts every split of a JSONL domain folder; returns the files written."""
  tf = tensorflow_cpu.tensorflow()
  if shards < 1:
    raise ValueError(f"--shards must be >= 1, got {shards}")
  if not os.path.isdir(domain_dir):
    raise sources_lib.DataError(f"missing domain folder {domain_dir}")
  os.makedirs(out_dir, exist_ok=True)
  written = []
  domain = os.path.basename(os.path.normpath(domain_dir))
  for split in sources_lib.SPLITS:
    path = os.path.join(domain_dir, f"{split}.jsonl")
    if not os.path.isfile(path):
      continue
    src = sources_lib.Source("jsonl", domain, split, (path,))
    ids = _ids(path)
    texts = list(sources_lib.read_texts(src, on_bad_line))
    if not texts:
      raise sources_lib.DataError(f"domain {domain!r}: {path} has no documents")
    n = len(texts)
    for k in range(shards):
      final = os.path.join(out_dir, f"{split}.tfrecord-{k:05d}-of-{shards:05d}")
      tmp = final + ".tmp"
      with tf.io.TFRecordWriter(tmp) as w:
        for i in range(k * n // shards, (k + 1) * n // shards):
          feats = {"text": _bytes(texts[i].encode("utf-8"))}
          if i < len(ids):
            feats["id"] = _bytes(ids[i].encode("utf-8"))
          w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
      os.replace(tmp, final)
      written.append(final)
  if not written:
    raise sources_lib.DataError(f"no train.jsonl or validation.jsonl in {domain_dir}")
  return written


def _ids(path: str) -> list[str]:
  """Best-effort ids (only used when every line parses)."""
  try:
    with open(path, encoding="utf-8") as f:
      return [str(json.loads(line).get("id", "")) for line in f if line.strip()]
  except (ValueError, UnicodeDecodeError, AttributeError):
    return []


def _bytes(b: bytes):
  tf = tensorflow_cpu.tensorflow()
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--domain_dir", required=True, help="folder with train/validation.jsonl")
  p.add_argument("--out", required=True, help="output folder for the TFRecord shards")
  p.add_argument("--shards", type=int, default=1, help="shards per split")
  p.add_argument("--on_bad_line", default="error", choices=("error", "skip"))
  a = p.parse_args(argv)
  for f in convert_domain(a.domain_dir, a.out, a.shards, a.on_bad_line):
    print(f)
  return 0


if __name__ == "__main__":
  sys.exit(main())
