#!/usr/bin/env bash
# The measurements that need one GPU (H100 / H200), as one script that fits a short lease:
#
#   1. throughput.py at the Llama-3.2-1B shape (d 2048, 16 layers, 32 / 8 heads, MLP 8192,
#      vocabulary 128,256, sequence 4096, batch 4, bf16, cuDNN attention, `dots_no_batch`
#      remat): tokens/s, MFU against the measured bf16 matmul peak and the datasheet
#      (`mfu_spec`); the same with `dots_no_batch_attention` (cuDNN attention's forward
#      kept, not recomputed: attention_1b.json); that step profiled, where two steps
#      spend their time (`profile` in profile_1b.json);
#   2. the same shape with 25% distill rows and a teacher over the plain step, measured in
#      one process with the two taking turns (`full` remat: both steps' states, the teacher
#      and one step's temporaries fit on the card together); then every feature's price
#      (replay, distill, top-k KD, sigma / tau routing, controllers) at the GPT-2-small
#      shape, where all the variants fit together (features_gpt2.json);
#   3. the replay suite at --preset gpu (34M parameters), 2 seeds, on the GPU in
#      SUITE_WORKERS (3) processes at once: a dev search (successive halving, 10 runs) over
#      SUITE_GRID (default search_grid_gpu_features.json: the 4.39M model's family,
#      `online` 1% with replay KD 1 / 2 and the residual-stream term 15 / 30, beside
#      `online` under KD 6 without it; search_grid_gpu_kd.json holds the earlier KD-only
#      grid) on the default split, then its choice beside random 5% on the
#      second split (M on man_fr, man_es, man_pl, legal; T = code_py), then no replay and
#      random 1% on the default split; its caches stay in $STATE, so running the script
#      again on the same machine continues it; 3b. every finished default-split run merged
#      back toward M (suite_interpolate.py: forgetting against gain, no training).
#
# Order: 1, 1a, 3, then 2b, 1b, 2 (each when the budget still holds it).
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh            # BUDGET=560 seconds by default
#
# Before the call, in the checkout (both folders are git-ignored; the call carries them):
#   cp -r ../shared/corpora .gpu_corpora
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       -d .whl ml-collections==1.1.0 importlib_resources
#
# Parts 1 and 2 are skipped when their JSON is already in $STATE (a second call), and a
# part is left for the next call when too little of BUDGET is left for it; the suite's
# finished runs are reused from its caches. Everything lands in $OUT: throughput_1b.json,
# attention_1b.json, profile_1b.json, distill_1b.json, features_gpt2.json, suite_rows.json
# (every finished suite row), search.json and search.chosen.json, split2.json, rows.json,
# interpolate.json, log.txt, trace.tgz. On one H200 parts 1 and 2 took about 6 min, M 2 min
# and each suite row about 1 min one at a time: the rest needs a second call on the same machine
# (BUDGET = the seconds it may use). CORPORA: the suite's corpora (default .gpu_corpora in
# the checkout: a git-ignored copy that the call carries). Wheels in .whl/ (packages the
# machine lacks, e.g. ml_collections) are installed first.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
STATE=${STATE:-/tmp/gpu_session}
BUDGET=${BUDGET:-560}
CORPORA=${CORPORA:-${CPT_CORPORA:-.gpu_corpora}}
START=$(date +%s)
mkdir -p "$STATE" "$OUT"
exec > >(tee -a "$STATE/log.txt") 2>&1
left() { echo $((BUDGET - ($(date +%s) - START))); }
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
echo "== $(date -u +%FT%TZ) budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())" || exit 1

# SHAPE, FEATURES (part 2b's rows), SUITE_EXTRA, SPLIT2, SUITE_GRID and SUITE_SEEDS change
# what runs (the
# CPU smoke test: SHAPE="--quick", FEATURES=replay_25, SUITE_EXTRA="--quick --pretrain-steps 6
# --cpt-steps 12 --old ... --new ...", SPLIT2="--old ... --new ...", SUITE_SEEDS=1).
read -r -a LLAMA <<< "${SHAPE:---llama_1b --attention cudnn --batch 4 --peak_n 8192} --no_baseline --nanodo no"
read -r -a EXTRA <<< "${SUITE_EXTRA:-}"
# measure NAME LIMIT TITLE ARGS...: throughput.py ARGS into $STATE/NAME.json within LIMIT
# seconds (kept only when it finished), unless NAME.json is there from an earlier call.
measure() {
  local name=$1 limit=$2 title=$3
  shift 3
  [ -s "$STATE/$name.json" ] && return 0
  echo "== $title ($(left)s left)"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout "$limit" python3 benchmarks/throughput.py "$@" \
    > "$STATE/$name.json.tmp" && mv "$STATE/$name.json.tmp" "$STATE/$name.json"
}
measure throughput_1b 200 "1. Llama-3.2-1B shape, dots_no_batch" \
  "${LLAMA[@]}" --remat dots_no_batch --no_features
if [ "$(left)" -gt 300 ]; then
  python3 -c "from jax._src.cudnn import fused_attention_stablehlo as fa
from cpt_jax.model.transformer import CUDNN_ATTENTION_FWD as names
print('cuDNN forward primitives', fa._dot_product_attention_fwd_p_wrapper.name,
      fa._dot_product_attention_fwd_p.name, 'kept by name:', sorted(names))"
  measure attention_1b 200 "1a. the same, cuDNN attention's forward kept by the remat" \
    "${LLAMA[@]}" --remat dots_no_batch_attention --no_features
fi
read -r -a SPLIT2 <<< "${SPLIT2:---old man_fr,man_es,man_pl,legal --new code_py --unavailable legal}"
# suite NAME ARGS...: cpt_suite.py --preset gpu ARGS in the budget left (less 25 s), its
# runs SUITE_WORKERS at a time on the one GPU (each process a share of its memory).
suite() {
  local name=$1 limit=$(( $(left) - 25 ))
  shift
  [ "$limit" -gt 30 ] || return 0
  echo "== 3. replay suite, --preset gpu: $name (${limit}s)"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout "$limit" python3 benchmarks/cpt_suite.py \
    --preset gpu --seeds "${SUITE_SEEDS:-2}" --workers "${SUITE_WORKERS:-3}" \
    --corpora "$CORPORA" --json "$STATE/$name.json" "${EXTRA[@]}" "$@"
  echo "suite $name rc $?"
}
if [ -d "$CORPORA" ]; then
  suite search --cache "$STATE/suite_cache" --search 10 \
    --search-grid "${SUITE_GRID:-benchmarks/search_grid_gpu_features.json}"
  [ -s "$STATE/search.chosen.json" ] && suite split2 --cache "$STATE/suite_cache2" \
    --only random_0.05 --add-rows "$STATE/search.chosen.json" "${SPLIT2[@]}"
  # The rest of the preset's rows on the default split: does 0.6M's ranking hold at 34M?
  suite rows --cache "$STATE/suite_cache" --only no_replay,random_0.01
  # 3b. Every finished default-split run merged back toward M (suite_interpolate.py, dev
  # picks a): does 0.6M's finding, merging stays on the replay-KD curve, hold at 34M?
  RUNS=$(ls -d "$STATE"/suite_cache/cpt-*/ 2>/dev/null | head -1)
  NAMES=$(for d in "$RUNS"*-s0; do [ -f "$d/row.json" ] && basename "$d" -s0; done | paste -sd, -)
  limit=$(( $(left) - 25 ))
  if [ -n "$NAMES" ] && [ "$limit" -gt 60 ] && [ ! -s "$STATE/interpolate.json" ]; then
    echo "== 3b. merging toward M: $NAMES (${limit}s)"
    timeout "$limit" python3 benchmarks/suite_interpolate.py --runs "$RUNS" --rows "$NAMES" \
      --alphas 1,0.97,0.95,0.9 --reference random_0.05 --json "$STATE/interpolate.json.tmp" \
      && mv "$STATE/interpolate.json.tmp" "$STATE/interpolate.json"
  fi
fi
if [ "$(left)" -gt 420 ]; then
  read -r -a GPT2 <<< "${SHAPE:---gpt2_small --attention cudnn}"
  FEATURE_ARGS=()
  [ -n "${FEATURES:-}" ] && FEATURE_ARGS=(--features "$FEATURES" --topk_vocabs '')
  measure features_gpt2 300 "2b. every feature's price at the GPT-2-small shape" \
    "${GPT2[@]}" --no_baseline --nanodo no "${FEATURE_ARGS[@]}"
fi
if [ "$(left)" -gt 300 ]; then
  # XLA's command buffers would put the whole step into one traced op: off for the trace.
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" measure profile_1b 150 \
    "1b. the same, profiled, command buffers off" "${LLAMA[@]}" \
    --remat dots_no_batch_attention --no_features --steps 3 --repeats 2 --profile "$STATE/trace"
fi
if [ "$(left)" -gt 200 ]; then
  measure distill_1b 260 "2. 25% distill rows with a teacher, full remat" "${LLAMA[@]}" \
    --remat full --topk_vocabs '' --features distill_25 --feature_rounds 5 --steps 3 --repeats 2
fi
python3 - "$STATE" <<'EOF'
import glob, json, os, sys
state = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(state, "suite_cache*", "**", "row.json"), recursive=True)):
  with open(path) as f:
    rows.append(json.load(f))
m = glob.glob(os.path.join(state, "suite_cache*", "pretrain-*", "*.json"))
with open(os.path.join(state, "suite_rows.json"), "w") as f:
  json.dump({"rows": rows, "pretrain_files": m}, f, indent=1)
print(f"{len(rows)} suite rows done")
EOF
MEASURED="throughput_1b attention_1b profile_1b distill_1b features_gpt2"
for f in $MEASURED suite_rows search search.chosen split2 rows interpolate; do
  [ -s "$STATE/$f.json" ] && cp "$STATE/$f.json" "$OUT/"
done
cp "$STATE/log.txt" "$OUT/"
[ -d "$STATE/trace" ] && tar czf "$OUT/trace.tgz" -C "$STATE" trace
# A file over the lease's 16 MiB limit would not come back: the summary in the JSON stays.
[ -f "$OUT/trace.tgz" ] && [ "$(stat -c %s "$OUT/trace.tgz")" -gt 15000000 ] && rm "$OUT/trace.tgz"
python3 - "$OUT" $MEASURED <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in (n + ".json" for n in sys.argv[2:]):
  p = os.path.join(out, name)
  if not os.path.exists(p):
    print(name, "missing"); continue
  d = json.load(open(p))
  keep = {k: d.get(k) for k in ("device", "remat", "tokens_per_sec", "seconds_per_step",
                                "compile_seconds", "model_tflops_per_step", "peak_gflops",
                                "mfu", "mfu_spec")}
  print(name, json.dumps(keep))
  if "profile" in d:
    p = d["profile"]
    print(" profile busy", round(p["busy_fraction"] or 0, 3),
          {k: round(v["share"], 3) for k, v in p["kinds"].items()})
    for o in p["top_ops"][:8]:
      print("  ", o["kind"], o["name"], round(o["share"], 3), o["count"])
  if "features" in d:
    print(" features", json.dumps({k: {kk: v.get(kk) for kk in ("ratio", "goal", "hlo_flops_ratio")}
                                   for k, v in d["features"].items() if isinstance(v, dict) and "ratio" in v}))
EOF
echo "== done, $(left)s of the budget left"
