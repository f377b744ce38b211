r"""Replay selection benchmark: forgetting vs replay size and selection cost.

  python benchmarks/cpt_suite.py --corpora /work/shared/corpora --json /tmp/cpt_suite.json
  python benchmarks/cpt_suite.py --corpora /work/shared/corpora --json /tmp/q.json --quick
  python benchmarks/cpt_suite.py ... --extras controllers,decomposition   # issue rows
  python benchmarks/cpt_suite.py ... --only 'no_replay,random_*,forgetting_0.01'
  python benchmarks/cpt_suite.py ... --random-fractions pareto   # random 0.5-25%
  python benchmarks/cpt_suite.py ... --search 24        # choose on dev (suite_search.py)
  python benchmarks/cpt_suite.py ... --add-rows OUT.chosen.json   # the chosen config's row
  python benchmarks/cpt_suite.py ... --preset gpu       # 34M params, one GPU, ~10 min
  python benchmarks/cpt_suite.py ... --preset mid       # 4.4M params, 2-core CPU, ~1 h

Pretrains M on --old (cached in --cache, keyed by the pretrain settings), then
continues pre-training on --new at equal T tokens for every row (see
suite_lib.py) and prints mean ± std over --seeds. Each domain's validation
text is split into a dev part (the `dev_*` columns, what a search chooses on)
and a test part (every other column). OUT holds one row per run (`rows`), the
aggregated table (`table`), the Pareto view (`pareto`, suite_pareto.py) and,
next to OUT, the plot <OUT>_pareto.png. A run's row is reused from the cache
only while its full config and the code version are unchanged.
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
import suite_pareto  # pylint: disable=wrong-import-position
import suite_search  # pylint: disable=wrong-import-position


def _fractions(text: str | None) -> tuple[float, ...] | None:
  if not text:
    return None
  if text == "pareto":
    return suite.PARETO_FRACTIONS
  return tuple(float(x) for x in text.split(","))


def _read_specs(path: str) -> tuple[dict, ...]:
  """--add-rows: one spec (a .chosen.json) or a list of specs."""
  with open(path, encoding="utf-8") as f:
    specs = json.load(f)
  specs = [specs] if isinstance(specs, dict) else specs
  for sp in specs:
    if not {"name", "strategy", "fraction"} <= set(sp):
      raise ValueError(f"--add-rows {path}: a row spec needs name, strategy and fraction")
  return tuple(specs)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--corpora", default=os.environ.get("CPT_CORPORA", ""))
  p.add_argument("--json", required=True, help="output JSON path")
  p.add_argument("--preset", default="", choices=("", *suite.PRESETS),
                 help="gpu: 34M params, 2 seeds, the rows that matter (suite_lib.gpu_preset); "
                      "mid: 4.4M params on CPU, 1 seed (suite_lib.mid_preset)")
  p.add_argument("--quick", action="store_true",
                 help="small model, 1 seed, 5%% column only (with --preset: the preset's rows)")
  p.add_argument("--old", default=None, help="comma-separated pretraining domains")
  p.add_argument("--new", default=None, help="the CPT domain")
  p.add_argument("--unavailable", default=None, help="old domain without data (distill row)")
  p.add_argument("--seeds", type=int, default=None)
  p.add_argument("--pretrain-steps", type=int, default=None)
  p.add_argument("--cpt-steps", type=int, default=None)
  p.add_argument("--strategies", default=None, help="comma-separated subset")
  p.add_argument("--strategy-fractions", default=None,
                 help="fractions of the strategy rows, comma-separated (default 0.01,0.05)")
  p.add_argument("--random-fractions", default=None,
                 help="random replay fractions, comma-separated, or 'pareto' (0.5-25%%)")
  p.add_argument("--extras", default="",
                 help="row groups beside the grid (default: kd): kd,controllers,decomposition")
  p.add_argument("--kd-strategies", default=None,
                 help="strategies of the '+kd' rows (default: random)")
  p.add_argument("--kd-weight", type=float, default=None,
                 help="objective.replay_kd of the '+kd' rows (default 4; rows named '+kdW')")
  p.add_argument("--only", default="", help="comma-separated row-name globs to run")
  p.add_argument("--dev-share", type=float, default=None,
                 help="share of each domain's validation documents in its dev part (0.5)")
  p.add_argument("--search", type=int, default=0, metavar="N",
                 help="choose on dev by successive halving over at most N runs "
                      "(suite_search.py); writes <OUT>.chosen.json")
  p.add_argument("--search-grid", default="", help="JSON list of candidate row specs")
  p.add_argument("--add-rows", default="", help="JSON row spec(s) to run beside the grid")
  p.add_argument("--workers", type=int, default=None,
                 help="parallel runs, one core each (default: one per core)")
  p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "cpt_suite_cache"))
  p.add_argument("--workdir", default="")
  a = p.parse_args(argv)
  s = suite.Settings(corpora=sources_lib.find_corpus_dir(a.corpora), cache=a.cache,
                     workdir=a.workdir)
  if a.preset:
    s = suite.PRESETS[a.preset](s)
  if a.quick:
    s = suite.quick(s, rows=not a.preset)
  over = {"old": tuple(a.old.split(",")) if a.old else None, "new": a.new,
          "unavailable": a.unavailable, "seeds": a.seeds, "pretrain_steps": a.pretrain_steps,
          "cpt_steps": a.cpt_steps,
          "strategies": tuple(a.strategies.split(",")) if a.strategies else None,
          "random_fractions": _fractions(a.random_fractions),
          "strategy_fractions": _fractions(a.strategy_fractions),
          "extras": tuple(x for x in a.extras.split(",") if x) or None, "only": a.only or None,
          "kd_strategies": tuple(a.kd_strategies.split(",")) if a.kd_strategies else None,
          "kd_weight": a.kd_weight, "dev_share": a.dev_share, "workers": a.workers}
  s = dataclasses.replace(s, **{k: v for k, v in over.items() if v is not None})
  log = lambda m: print(f"[cpt_suite] {m}", flush=True)
  stem = os.path.splitext(a.json)[0]
  if a.search:
    grid = suite_search.read_grid(a.search_grid) if a.search_grid else \
        suite_search.default_grid(s)
    out = suite_search.search(s, grid, a.search, log=log)
    with open(stem + ".chosen.json", "w", encoding="utf-8") as f:
      json.dump(out["search"]["chosen"], f, indent=2)
  else:
    extra = _read_specs(a.add_rows) if a.add_rows else ()
    out = suite.run_suite(s, log=log, extra_specs=extra)
  out["pareto"] = suite_pareto.pareto(out["table"])
  out["pareto"]["plot"] = suite_pareto.plot(out["table"], stem + "_pareto.png")
  table = suite.format_table(out["table"])
  print(table, flush=True)
  out["markdown"] = table
  with open(a.json, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
