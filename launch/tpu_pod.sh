#!/usr/bin/env bash
# The same command on every worker of a Cloud TPU VM pod (jax.distributed detects it).
#   TPU_NAME=my-pod ZONE=us-central2-b bash launch/tpu_pod.sh \
#     --config=configs/gpt_small.py:size=base --workdir=gs://bucket/runs/gpt_base
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd ~/boldjax && python -m boldjax.main${args}"
