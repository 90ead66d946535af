#!/bin/sh
# Sensor traffic for the quick start's devices: the sample windows (windows.jsonl, one request of 9 records)
# to each agent's /v1/infer, 5 times a second, for at most DURATION seconds (default 1200), then it stops.
# Usage: examples/pump/traffic.sh PORT [PORT...]
set -eu
[ "$#" -gt 0 ] || { echo "usage: $0 PORT [PORT...]  (the agents' --http-port)" >&2; exit 2; }
batch="[$(paste -sd, "$(dirname "$0")/windows.jsonl")]"
end=$(( $(date +%s) + ${DURATION:-1200} ))
rounds=0
while [ "$(date +%s)" -lt "$end" ] && [ "$rounds" -lt 10000 ]; do
    for port in "$@"; do
        curl -s -o /dev/null -X POST "http://127.0.0.1:$port/v1/infer" -H "Content-Type: application/json" \
            -d "$batch" || true
    done
    rounds=$((rounds + 1))
    sleep 0.2
done
