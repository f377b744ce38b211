r"""Replay selection benchmark: forgetting vs replay size and selection cost.

  python benchmarks/cpt_suite.py --corpora /work/shared/corpora --json /tmp/cpt_suite.json
  python benchmarks/cpt_suite.py --corpora /work/shared/corpora --json /tmp/q.json --quick
  python benchmarks/cpt_suite.py ... --extras controllers,decomposition   # issue rows
  python benchmarks/cpt_suite.py ... --only 'no_replay,random_*,forgetting_0.01'

Pretrains M on --old (cached in --cache, keyed by the pretrain settings), then
continues pre-training on --new at equal T tokens for every row (see
cpt_jax/replay/suite.py) and prints mean ± std over --seeds. OUT holds one
row per run (`rows`) and the aggregated table (`table`). A run's row is reused
from the cache only while its full config and the code version are unchanged.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpt_jax.data import sources as sources_lib  # pylint: disable=wrong-import-position
import suite_lib as suite  # pylint: disable=wrong-import-position


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--corpora", default=os.environ.get("CPT_CORPORA", ""))
  p.add_argument("--json", required=True, help="output JSON path")
  p.add_argument("--quick", action="store_true", help="small model, 1 seed, 5%% column only")
  p.add_argument("--old", default=None, help="comma-separated pretraining domains")
  p.add_argument("--new", default=None, help="the CPT domain")
  p.add_argument("--unavailable", default=None, help="old domain without data (distill row)")
  p.add_argument("--seeds", type=int, default=None)
  p.add_argument("--pretrain-steps", type=int, default=None)
  p.add_argument("--cpt-steps", type=int, default=None)
  p.add_argument("--strategies", default=None, help="comma-separated subset")
  p.add_argument("--extras", default="",
                 help="row groups beside the grid (default: kd): kd,controllers,decomposition")
  p.add_argument("--kd-strategies", default=None,
                 help="strategies of the '+kd' rows (default: random)")
  p.add_argument("--kd-weight", type=float, default=None,
                 help="objective.replay_kd of the '+kd' rows (default 4; rows named '+kdW')")
  p.add_argument("--only", default="", help="comma-separated row-name globs to run")
  p.add_argument("--workers", type=int, default=0,
                 help="parallel runs, one core each (default: one per core)")
  p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "cpt_suite_cache"))
  p.add_argument("--workdir", default="")
  a = p.parse_args(argv)
  s = suite.Settings(corpora=sources_lib.find_corpus_dir(a.corpora), cache=a.cache,
                     workdir=a.workdir)
  if a.quick:
    s = suite.quick(s)
  over = {"old": tuple(a.old.split(",")) if a.old else None, "new": a.new,
          "unavailable": a.unavailable, "seeds": a.seeds, "pretrain_steps": a.pretrain_steps,
          "cpt_steps": a.cpt_steps,
          "strategies": tuple(a.strategies.split(",")) if a.strategies else None,
          "extras": tuple(x for x in a.extras.split(",") if x) or None, "only": a.only or None,
          "kd_strategies": tuple(a.kd_strategies.split(",")) if a.kd_strategies else None,
          "kd_weight": a.kd_weight,
          "workers": a.workers}
  s = dataclasses.replace(s, **{k: v for k, v in over.items() if v is not None})
  out = suite.run_suite(s, log=lambda m: print(f"[cpt_suite] {m}", flush=True))
  table = suite.format_table(out["table"])
  print(table, flush=True)
  out["markdown"] = table
  with open(a.json, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
