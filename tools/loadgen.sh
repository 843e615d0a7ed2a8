#!/usr/bin/env bash
# `make loadgen`: the loadgenerator chart's Locust journeys (charts/loadgenerator/files/locustfile.py) against
# the local ingress, headless and bounded: USERS shoppers (default 10) for DURATION (default 1m).
# Exits non-zero when any request failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"
host=${HOST_URL:-http://127.0.0.1:8080}
if ! curl -fsS -o /dev/null --max-time 5 "$host/health"; then
  echo "loadgen: nothing answers at $host/health: start the platform with \`make up\` first" >&2
  exit 1
fi
exec uv run --locked locust -f charts/loadgenerator/files/locustfile.py --host "$host" \
  --headless -u "${USERS:-10}" -r "${SPAWN_RATE:-2}" -t "${DURATION:-1m}" --only-summary
