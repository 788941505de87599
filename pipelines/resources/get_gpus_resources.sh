#!/usr/bin/env bash
# Spark GPU discovery script (spark.worker.resource.gpu.discoveryScript /
# spark.executor.resource.gpu.discoveryScript): prints {"name": "gpu", "addresses": [...]}.
# Uses nvidia-smi where present. CLINLONG_GPU_ADDRESSES="0,1" overrides it (tests, or pinning GPUs).
set -euo pipefail
if [[ -n "${CLINLONG_GPU_ADDRESSES:-}" ]]; then
  addrs="${CLINLONG_GPU_ADDRESSES}"
elif command -v nvidia-smi >/dev/null 2>&1; then
  addrs=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
else
  addrs=""
fi
json=$(printf '%s' "$addrs" | awk -F, '{for (i = 1; i <= NF; i++) printf "%s\"%s\"", (i > 1 ? "," : ""), $i}')
echo "{\"name\": \"gpu\", \"addresses\": [${json}]}"
