#!/usr/bin/env bash
# Starts one cpt_jax run on every worker of a TPU VM slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#
# WORKDIR must be reachable from every worker (e.g. gs://bucket/run). The repo is
# copied to each worker, installed, and started with CPT_DISTRIBUTED=1 so that
# jax.distributed.initialize() runs (TPU VMs provide coordinator and process ids).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
EXTRA="$*"
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=cpt_jax

gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all \
  "$REPO_DIR" "$TPU_NAME:~/$REMOTE_DIR"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/$REMOTE_DIR
  python3 -m pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  CPT_DISTRIBUTED=1 python3 -m cpt_jax.main --config=$CONFIG --workdir=$WORKDIR \
    --config.distributed.initialize=yes $EXTRA 2>&1 | tee -a ~/cpt_jax_\$(hostname).log
"
