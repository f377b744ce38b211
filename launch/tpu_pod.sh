#!/usr/bin/env bash
# Starts one cpt_jax run on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh --status TPU_NAME ZONE RUN_ID
#   launch/tpu_pod.sh --stop TPU_NAME ZONE
#
# What it does:
#   1. packs this checkout (tar, without .git, run folders, caches, build outputs) with the
#      run's argument vector (NUL-separated, so every override arrives byte for byte) and
#      copies it to every worker (`gcloud compute tpus tpu-vm scp --worker=all`);
#   2. on each worker (`gcloud compute tpus tpu-vm ssh --worker=all`), unpacks it into a
#      fresh folder ~/cpt_runs/RUN_ID (a new folder per launch: a second launch runs the new
#      code, never a nested or stale copy), stops earlier runs of this script and any other
#      process holding the TPU, removes /tmp/libtpu_lockfile, installs `jax[tpu]` and the
#      checkout, and starts the run under `setsid nohup` (it survives the ssh session);
#   3. waits for the run and exits with its status: 0 when every worker's run exited 0,
#      otherwise the first non-zero status (1 when one of the workers that
#      `gcloud compute tpus tpu-vm describe` lists reported nothing).
#
# The run is `$CPT_ENTRY --config=CONFIG --workdir=WORKDIR --config.distributed.initialize=yes
# OVERRIDES...` in the unpacked checkout; jax.distributed.initialize() then finds the
# coordinator, process count and id from the TPU VM's metadata (no variables needed).
# WORKDIR must be shared by the workers (gs://bucket/run); a local path gets a warning.
#
# Settings (environment variables of the launching machine):
#   CPT_ENTRY         command that starts a run, split on spaces
#                     (default: python3 -m cpt_jax.main)
#   CPT_DETACH=1      return once every worker has started; the run's status is then
#                     written to ~/cpt_runs/RUN_ID/exit_status on each worker and read back by
#                     `launch/tpu_pod.sh --status TPU_NAME ZONE RUN_ID` (exit 0: all done and
#                     0; 3: still running; else the first failure's status, 1 when a worker
#                     reported nothing)
#   CPT_RUN_ID        name of the per-run folder (default: UTC time + random suffix)
#   CPT_VENV          a virtual environment, relative to the workers' home (e.g. venv), made
#                     once (--system-site-packages) and put first on PATH for the installs
#                     and the run; for images whose system pip refuses installs (PEP 668)
#   CPT_INSTALL=0     skip the pip installs (the workers already have jax[tpu] and the deps)
#   CPT_JAX_SPEC      what pip installs for JAX (default: jax[tpu])
#   CPT_PIP           pip command on the workers (default: python3 -m pip)
#   CPT_KILL_GRACE    seconds a stale run gets after SIGTERM (it checkpoints) before SIGKILL
#                     (default: 30)
# On the workers (rarely changed): CPT_TPU_DEVICES (device files whose holders are stopped;
# default /dev/accel* /dev/vfio/[0-9]*) and CPT_TPU_LOCKFILE (default /tmp/libtpu_lockfile).
#
# Each worker's output goes to ~/cpt_runs/RUN_ID/log; the launch shows worker 0's. The run
# goes on when the launch is interrupted (Ctrl-C); `--stop` stops every run of this script on
# the slice (SIGTERM, so it checkpoints; SIGKILL after CPT_KILL_GRACE) and removes the lockfile.
set -euo pipefail

readonly RUNS=cpt_runs  # per-run folders, under the worker's home
readonly MARK="cpt-launch:"  # prefix of the status lines the workers print

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

# ---------------------------------------------------------------- on a worker

worker_id() {
  if [ -n "${TPU_WORKER_ID:-}" ]; then echo "$TPU_WORKER_ID"; return; fi
  curl -s -m 2 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null || hostname
}

# Sets PSTATE and PGRP of process $1 (builtins only: no fork per process); fails when gone.
proc_fields() {
  local s f=()
  { read -r s < "/proc/$1/stat"; } 2>/dev/null || return 1
  read -r -a f <<< "${s##*) }"  # the fields after "(comm)": state ppid pgrp ...
  PSTATE=${f[0]}; PGRP=${f[2]}
}

# Live (non-zombie) process ids in process group $1.
group_members() {
  local p
  for p in /proc/[0-9]*; do
    proc_fields "${p#/proc/}" && [ "$PSTATE" != Z ] && [ "$PGRP" = "$1" ] && echo "${p#/proc/}"
  done
  return 0
}

alive() { proc_fields "$1" && [ "$PSTATE" != Z ]; }

# Process ids (other than this shell) with one of the files $@ open.
holders() {
  local f expr=()
  for f in "$@"; do
    f=${f//\\/\\\\}; f=${f//\*/\\*}; f=${f//\?/\\?}; f=${f//\[/\\[}
    expr+=(${expr[0]+-o} -lname "$f")
  done
  find /proc/[0-9]*/fd -maxdepth 1 \( "${expr[@]}" \) 2>/dev/null \
    | cut -d/ -f3 | sort -un | { grep -vx "$$" || true; }
  return 0
}

# Stops earlier runs of this script (SIGTERM to their process group, so they checkpoint)
# and every process holding a TPU device file; SIGKILL after CPT_KILL_GRACE seconds.
stop_stale() {
  local this=$1 pidfile dir pgid pids=() devs=() d t
  for pidfile in "$HOME/$RUNS"/*/pid; do
    [ -f "$pidfile" ] || continue
    dir=$(dirname "$pidfile")
    [ "$dir" = "$this" ] || [ -L "$dir" ] && continue  # this run; `latest`
    pgid=$(cat "$pidfile")
    if [ -n "$(group_members "$pgid")" ]; then
      echo "$MARK stopping run $(basename "$dir") (process group $pgid)"
      kill -TERM -- "-$pgid" 2>/dev/null || true
      mapfile -t -O "${#pids[@]}" pids < <(group_members "$pgid")
    fi
  done
  # shellcheck disable=SC2086  # a list of globs
  for d in ${CPT_TPU_DEVICES:-/dev/accel* /dev/vfio/[0-9]*}; do
    [ -e "$d" ] && devs+=("$(readlink -f "$d")")
  done
  if [ "${#devs[@]}" -gt 0 ]; then
    for t in $(holders "${devs[@]}"); do
      alive "$t" || continue
      echo "$MARK stopping process $t (holds the TPU)"
      kill -TERM "$t" 2>/dev/null || die "cannot stop process $t holding the TPU (another user's? try: sudo kill $t)"
      pids+=("$t")
    done
  fi
  [ "${#pids[@]}" -eq 0 ] && return 0
  for ((t = 0; t < ${CPT_KILL_GRACE:-30} * 10; t++)); do
    local left=()
    for d in "${pids[@]}"; do alive "$d" && left+=("$d"); done
    [ "${#left[@]}" -eq 0 ] && return 0
    sleep 0.1
  done
  for d in "${pids[@]}"; do
    alive "$d" && { echo "$MARK SIGKILL to $d"; kill -KILL "$d" 2>/dev/null || true; }
  done
  return 0
}

# Runs the argument vector of run folder $1 (its own session, started by `worker`).
job() {
  local dir=$1 argv=() rc
  set +e
  echo "$$" > "$dir/pid"
  trap ':' TERM INT  # handled (not ignored), so the run itself still receives them
  cd "$dir/code" || exit 1
  export PYTHONPATH="$dir/code${PYTHONPATH:+:$PYTHONPATH}"
  mapfile -d '' argv < "$dir/argv"
  "${argv[@]}"
  rc=$?
  echo "$rc" > "$dir/exit_status.tmp" && mv "$dir/exit_status.tmp" "$dir/exit_status"
  exit "$rc"
}

# Everything a worker does for run folder $1 (unpacked by the launch command). Every way
# out prints one status line "cpt-launch: worker W exit RC" (or "... started" when detached).
worker() {
  local dir=$1 pid rc i tail_pid="" pip=()
  W=$(worker_id)
  REPORTED=""
  trap 'rc=$?; [ -n "$REPORTED" ] || echo "$MARK worker $W exit $rc"' EXIT
  # shellcheck source=/dev/null  # written by the launch with printf %q
  . "$dir/settings"
  cd "$dir"
  stop_stale "$dir"
  rm -f "${CPT_TPU_LOCKFILE:-/tmp/libtpu_lockfile}"
  if [ -n "$CPT_VENV" ]; then
    [ -x "$HOME/$CPT_VENV/bin/python3" ] || python3 -m venv --system-site-packages "$HOME/$CPT_VENV"
    export PATH="$HOME/$CPT_VENV/bin:$PATH"
  fi
  if [ "$CPT_INSTALL" != 0 ]; then
    read -r -a pip <<< "$CPT_PIP"
    if ! { "${pip[@]}" install -q -U "$CPT_JAX_SPEC" && "${pip[@]}" install -q -e "$dir/code"; } \
        >> "$dir/install.log" 2>&1; then
      tail -n 20 "$dir/install.log"
      echo "pip install failed; see $dir/install.log"
      exit 1
    fi
  fi
  ln -sfn "$dir" "$HOME/$RUNS/latest"
  setsid -w nohup bash "$dir/code/launch/tpu_pod.sh" --job "$dir" > "$dir/log" 2>&1 < /dev/null &
  pid=$!
  # Until the job has its own session (it writes its pid then), the end of this ssh
  # session's process group (SIGHUP) would take it along.
  for ((i = 0; i < 300; i++)); do
    [ -s "$dir/pid" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "$MARK worker $W started $dir"
  if [ "$CPT_DETACH" = 1 ]; then
    REPORTED=1
    exit 0
  fi
  if [ "$W" = 0 ]; then
    tail -n +1 -F "$dir/log" 2>/dev/null &
    tail_pid=$!
  fi
  wait "$pid" && rc=0 || rc=$?
  if [ -n "$tail_pid" ]; then sleep 0.5; kill "$tail_pid" 2>/dev/null || true; fi
  exit "$rc"
}

# Stops every run of this script on this worker (`--stop`).
worker_stop() {
  W=$(worker_id)
  # shellcheck source=/dev/null  # CPT_KILL_GRACE of the last launch
  . "$HOME/$RUNS/latest/settings"
  stop_stale ""
  rm -f "${CPT_TPU_LOCKFILE:-/tmp/libtpu_lockfile}"
  echo "$MARK worker $W exit 0"
}

# Prints the status line of run folder $1 on this worker.
worker_status() {
  local dir=$1 w
  w=$(worker_id)
  if [ -f "$dir/exit_status" ]; then
    echo "$MARK worker $w exit $(cat "$dir/exit_status")"
  elif [ -f "$dir/pid" ] && [ -n "$(group_members "$(cat "$dir/pid")")" ]; then
    echo "$MARK worker $w running"
  else
    echo "$MARK worker $w missing (no run in $dir)"
  fi
}

# ------------------------------------------------------- on the launching machine

# The exit status from the workers' status lines on stdin (the last line of each worker
# counts), $1 workers expected (0: unknown): 0 when all exited 0 (or, detached, started); the
# first failure's status (1 when it has none) when one failed, or 1 when fewer reported; 3 when
# one is still running.
summarise() {
  local expected=${1:-0} line w n=0 bad=0 running=0 first=""
  local -A last=()
  while IFS= read -r line; do
    [[ $line =~ ^"$MARK worker "([^ ]+)" "(.*)$ ]] || continue
    last[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
  done
  for w in "${!last[@]}"; do
    n=$((n + 1))
    case ${last[$w]} in
      "exit 0" | started*) ;;
      running) running=$((running + 1)) ;;
      *) bad=$((bad + 1))
         line=${last[$w]#exit }; line=${line%% *}
         [[ $line =~ ^[0-9]+$ ]] && [ "$line" -gt 0 ] && [ "$line" -lt 256 ] || line=1
         first=${first:-$line} ;;
    esac
  done
  echo "tpu_pod.sh: $n of ${expected/#0/?} worker(s) reported: $bad failed, $running running" >&2
  [ "$n" -eq 0 ] && return 1
  if [ "$n" -lt "$expected" ]; then
    echo "tpu_pod.sh: $((expected - n)) worker(s) of $TPU_NAME reported nothing" >&2
    return 1
  fi
  [ "$bad" -gt 0 ] && return "$first"
  [ "$running" -gt 0 ] && return 3
  return 0
}

# Number of workers of the slice (0 when gcloud cannot say).
count_workers() {
  local ips
  ips=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" \
          --format='value(networkEndpoints[].ipAddress)' 2>/dev/null) || ips=""
  if [ -z "$ips" ]; then
    echo "tpu_pod.sh: warning: could not count the workers of $TPU_NAME" >&2
    echo 0
    return
  fi
  ips=${ips//[^;]/}
  echo $(( ${#ips} + 1 ))
}

check_name() { [[ $2 =~ ^[A-Za-z0-9._-]+$ ]] || die "$1 must match [A-Za-z0-9._-]+, got '$2'"; }

# Streams a gcloud ssh command's output, keeping it in $1; fails when gcloud fails.
remote() {
  local log=$1; shift
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$*" 2>&1 \
    | tee "$log"
}

# Runs a command on every worker and exits with the summary of their status lines.
remote_summary() {
  local tmp rc=0
  tmp=$(mktemp)
  remote "$tmp" "$@" || true
  summarise "$(count_workers)" < "$tmp" || rc=$?
  rm -f "$tmp"
  exit "$rc"
}

status() {
  [ $# -eq 3 ] || die "usage: $0 --status TPU_NAME ZONE RUN_ID"
  TPU_NAME=$1; ZONE=$2
  check_name RUN_ID "$3"
  remote_summary "bash \"\$HOME/$RUNS/$3/code/launch/tpu_pod.sh\" --worker-status \"\$HOME/$RUNS/$3\""
}

stop() {
  [ $# -eq 2 ] || die "usage: $0 --stop TPU_NAME ZONE"
  TPU_NAME=$1; ZONE=$2
  remote_summary "f=\"\$HOME/$RUNS/latest/code/launch/tpu_pod.sh\"
if [ -f \"\$f\" ]; then exec bash \"\$f\" --worker-stop; fi
echo \"$MARK worker \$(hostname) exit 0 (no runs)\""
}

launch() {
  [ $# -ge 4 ] || die "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]"
  TPU_NAME=$1; ZONE=$2
  local config=$3 workdir=$4; shift 4
  local repo run_id stage workers entry=() gcloud_rc=0 rc=0
  repo=$(cd "$(dirname "$0")/.." && pwd)
  run_id=${CPT_RUN_ID:-$(date -u +%Y%m%d-%H%M%S)-$RANDOM}
  check_name CPT_RUN_ID "$run_id"
  if ! [[ ${CPT_VENV:-} =~ ^([A-Za-z0-9._-]+/?)*$ ]] || [[ ${CPT_VENV:-} == *..* ]]; then
    die "CPT_VENV must be a folder below the workers' home, got '$CPT_VENV'"
  fi
  read -r -a entry <<< "${CPT_ENTRY:-python3 -m cpt_jax.main}"
  [ "${#entry[@]}" -gt 0 ] || die "CPT_ENTRY is empty"
  case $workdir in
    *://*) ;;
    *) echo "tpu_pod.sh: warning: WORKDIR '$workdir' is not a bucket path; on a slice of" \
            "more than one worker each worker writes its own copy" >&2 ;;
  esac

  stage=$(mktemp -d)
  STAGE=$stage
  trap 'rm -rf "$STAGE"' EXIT
  # Top-level run folders and build outputs (anchored: cpt_jax/train/workdir.py ships),
  # then caches anywhere.
  tar -czf "$stage/code.tar.gz" -C "$repo" \
    --anchored --exclude=./.git --exclude='./workdir*' --exclude=./runs --exclude=./build \
    --exclude=./dist --exclude=./.venv --exclude=./.benchmarks \
    --no-anchored --exclude-vcs --exclude=__pycache__ --exclude='*.pyc' --exclude='.*_cache' \
    --exclude='*.egg-info' .
  printf '%s\0' "${entry[@]}" "--config=$config" "--workdir=$workdir" \
    --config.distributed.initialize=yes "$@" > "$stage/argv"
  {
    printf 'CPT_DETACH=%q\n' "${CPT_DETACH:-0}"
    printf 'CPT_INSTALL=%q\n' "${CPT_INSTALL:-1}"
    printf 'CPT_VENV=%q\n' "${CPT_VENV:-}"
    printf 'CPT_JAX_SPEC=%q\n' "${CPT_JAX_SPEC:-jax[tpu]}"
    printf 'CPT_PIP=%q\n' "${CPT_PIP:-python3 -m pip}"
    printf 'CPT_KILL_GRACE=%q\n' "${CPT_KILL_GRACE:-30}"
  } > "$stage/settings"
  tar -cf "$stage/bundle.tar" -C "$stage" code.tar.gz argv settings

  workers=$(count_workers)
  echo "tpu_pod.sh: run $run_id: copying $(du -h "$stage/bundle.tar" | cut -f1) to the workers of $TPU_NAME" >&2
  gcloud compute tpus tpu-vm scp --zone "$ZONE" --worker=all \
    "$stage/bundle.tar" "$TPU_NAME:cpt_bundle_$run_id.tar"
  # RUN_ID is checked above, so these lines need no further quoting.
  local boot="set -e
d=\"\$HOME/$RUNS/$run_id\"; b=\"\$HOME/cpt_bundle_$run_id.tar\"
if [ -e \"\$d\" ]; then echo \"$MARK worker ? exit 1 (\$d exists: choose another CPT_RUN_ID)\"; exit 1; fi
mkdir -p \"\$d/code\"; tar -xf \"\$b\" -C \"\$d\"; rm -f \"\$b\"
tar -xzf \"\$d/code.tar.gz\" -C \"\$d/code\"; rm -f \"\$d/code.tar.gz\"
exec bash \"\$d/code/launch/tpu_pod.sh\" --worker \"\$d\""
  remote "$stage/remote.log" "$boot" || gcloud_rc=$?
  summarise "$workers" < "$stage/remote.log" || rc=$?
  if [ "${CPT_DETACH:-0}" = 1 ] && [ "$rc" -eq 0 ]; then
    echo "tpu_pod.sh: run $run_id started; status: $0 --status $TPU_NAME $ZONE $run_id" >&2
  fi
  [ "$rc" -eq 0 ] && [ "$gcloud_rc" -ne 0 ] && rc=$gcloud_rc
  exit "$rc"
}

case ${1:-} in
  --job) job "$2" ;;
  --worker) worker "$2" ;;
  --worker-status) worker_status "$2" ;;
  --worker-stop) worker_stop ;;
  --status) shift; status "$@" ;;
  --stop) shift; stop "$@" ;;
  *) launch "$@" ;;
esac
