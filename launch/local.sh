#!/usr/bin/env bash
# N processes of boldjax.main on this machine, talking through jax.distributed.
#   bash launch/local.sh 2 --config=configs/gpt_small.py --workdir=runs/gpt_2proc
# Each process sees its own CPU devices (BOLDJAX_LOCAL_DEVICES, default 1).
set -euo pipefail
n=${1:?usage: launch/local.sh NUM_PROCESSES ARGS...}
shift
port=${BOLDJAX_PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${BOLDJAX_LOCAL_DEVICES:-1}" \
    python -m boldjax.main --coordinator="127.0.0.1:${port}" --num_processes="$n" \
    --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
