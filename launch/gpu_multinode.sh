#!/usr/bin/env bash
# Starts one cpt_jax process per node of a multi-node GPU job (one process per
# node drives all of its local GPUs).
#
# Under SLURM (one task per node):
#   srun --nodes=N --ntasks-per-node=1 --gpus-per-node=8 \
#     launch/gpu_multinode.sh CONFIG WORKDIR [--config.key=value ...]
# Elsewhere, run it on every node with the variables set by hand:
#   COORDINATOR=host0:12345 NUM_PROCESSES=N PROCESS_ID=i launch/gpu_multinode.sh CONFIG WORKDIR
#
# WORKDIR must be on a filesystem shared by all nodes.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2

if [ -n "${SLURM_JOB_ID:-}" ]; then
  FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  COORDINATOR=${COORDINATOR:-$FIRST_NODE:${COORDINATOR_PORT:-12345}}
  NUM_PROCESSES=${NUM_PROCESSES:-$SLURM_NTASKS}
  PROCESS_ID=${PROCESS_ID:-$SLURM_PROCID}
fi
: "${COORDINATOR:?set COORDINATOR=host:port (or run under SLURM)}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID}"

exec python3 -m cpt_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.distributed.initialize=yes \
  --config.distributed.coordinator_address="$COORDINATOR" \
  --config.distributed.num_processes="$NUM_PROCESSES" \
  --config.distributed.process_id="$PROCESS_ID" "$@"
