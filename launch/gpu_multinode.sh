#!/usr/bin/env bash
# Starts the cpt_jax process of one task of a multi-node GPU job.
#
# Under SLURM, from a batch script (launch/slurm.sbatch) or an allocation:
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
#     launch/gpu_multinode.sh CONFIG WORKDIR [--config.key=value ...]
# One task per node drives all of the node's GPUs; with --ntasks-per-node=T each task
# drives 1/T of them (T = GPUs per node: one process per GPU). jax.distributed.initialize()
# finds the coordinator (first node of the step, port from the job id), the process count
# and this process's id in SLURM's variables; nothing needs to be set by hand.
# Elsewhere, on every node:
#   COORDINATOR=host0:12345 NUM_PROCESSES=N PROCESS_ID=i \
#     launch/gpu_multinode.sh CONFIG WORKDIR [--config.key=value ...]
#
# GPUs: the process drives the GPUs it sees (CUDA_VISIBLE_DEVICES, as SLURM sets it) split
# evenly between the tasks of its node, through JAX_LOCAL_DEVICE_IDS (JAX otherwise takes
# one GPU per task, the one numbered SLURM_LOCALID). A task that SLURM bound to its own GPUs
# (--gpus-per-task) drives all it sees. Set JAX_LOCAL_DEVICE_IDS yourself to override.
# TensorFlow (tf.data in the data pipeline) gets TF_FORCE_GPU_ALLOW_GROWTH=true, so it never
# claims the GPUs' memory up front.
#
# Overrides reach the run unchanged (srun passes argv as is); the script execs the run, so
# its exit status is the task's and srun's (non-zero when a task fails).
# WORKDIR must be shared by the nodes (gs://bucket/run or a shared filesystem).
#
# CPT_ENTRY: command that starts a run, split on spaces (default: python3 -m cpt_jax.main).
set -euo pipefail

die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }

# Tasks of this step on this node (SLURM_TASKS_PER_NODE is e.g. "2(x3),1" by node id).
tasks_on_node() {
  local spec=${SLURM_TASKS_PER_NODE:-} node=${SLURM_NODEID:-0} i=0 part count rep parts=()
  if [ -z "$spec" ]; then echo "${SLURM_NTASKS_PER_NODE:-1}"; return; fi
  IFS=, read -r -a parts <<< "$spec"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      count=${BASH_REMATCH[1]}; rep=${BASH_REMATCH[2]}
    else
      count=$part; rep=1
    fi
    if [ "$node" -lt $((i + rep)) ]; then echo "$count"; return; fi
    i=$((i + rep))
  done
  echo 1
}

# Comma-separated local GPU ordinals for this process ("" when it sees no GPU).
local_device_ids() {
  local n total k per first ids=() g devs=()
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    IFS=, read -r -a devs <<< "$CUDA_VISIBLE_DEVICES"
    n=${#devs[@]}
  elif command -v nvidia-smi > /dev/null; then
    n=$(nvidia-smi -L | grep -c '^GPU' || true)
  else
    n=0
  fi
  [ "$n" -gt 0 ] || return 0
  total=${SLURM_GPUS_ON_NODE:-$n}
  k=$(tasks_on_node)
  if [ "$n" -lt "$total" ] || [ "$k" -le 1 ]; then
    per=$n; first=0  # bound to this task, or the node's only task
  else
    [ $((n % k)) -eq 0 ] || die "$n GPUs on this node do not split over $k tasks"
    per=$((n / k)); first=$((${SLURM_LOCALID:-0} * per))
  fi
  for ((g = first; g < first + per; g++)); do ids+=("$g"); done
  (IFS=,; echo "${ids[*]}")
}

[ $# -ge 2 ] || die "usage: $0 CONFIG WORKDIR [--config.key=value ...]"
config=$1; workdir=$2; shift 2
read -r -a entry <<< "${CPT_ENTRY:-python3 -m cpt_jax.main}"
[ "${#entry[@]}" -gt 0 ] || die "CPT_ENTRY is empty"

dist=(--config.distributed.initialize=yes)
if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_PROCID:-}" ]; then
  :  # JAX reads SLURM's variables
elif [ -n "${COORDINATOR:-}${NUM_PROCESSES:-}${PROCESS_ID:-}" ]; then
  : "${COORDINATOR:?set COORDINATOR=host:port with NUM_PROCESSES and PROCESS_ID}"
  : "${NUM_PROCESSES:?set NUM_PROCESSES with COORDINATOR and PROCESS_ID}"
  : "${PROCESS_ID:?set PROCESS_ID with COORDINATOR and NUM_PROCESSES}"
  dist+=("--config.distributed.coordinator_address=$COORDINATOR"
         "--config.distributed.num_processes=$NUM_PROCESSES"
         "--config.distributed.process_id=$PROCESS_ID")
else
  die "not a SLURM task (run it through srun) and COORDINATOR / NUM_PROCESSES / PROCESS_ID unset"
fi

if [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
  gpu_ids=$(local_device_ids)
  if [ -n "$gpu_ids" ]; then export JAX_LOCAL_DEVICE_IDS=$gpu_ids; fi
fi
export TF_FORCE_GPU_ALLOW_GROWTH=true
echo "gpu_multinode.sh: process ${SLURM_PROCID:-${PROCESS_ID:-}} on $(hostname):" \
     "GPUs ${JAX_LOCAL_DEVICE_IDS:-none} of CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}" >&2
exec "${entry[@]}" "--config=$config" "--workdir=$workdir" "${dist[@]}" "$@"
