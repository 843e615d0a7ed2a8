#!/usr/bin/env bash
# Prints, per build step, its latest cold (built) and warm (cached) time, and per `make kind-up` deploy step
# (deploy/*: add-ons, Istio, skaffold build/load/deploy, ...) its latest time, from ~/.cache/emporium/timings.tsv.
set -euo pipefail
file=${EMPORIUM_CACHE:-$HOME/.cache/emporium}/timings.tsv
[ -f "$file" ] || { echo "no timings yet ($file)" >&2; exit 1; }
awk -F'\t' '
  { if (!($2 in seen)) { seen[$2] = 1; order[++n] = $2 }
    if ($3 == "cold") cold[$2] = $4; else if ($3 == "run") run[$2] = $4; else warm[$2] = $4 }
  END { printf "%-42s %8s %8s %8s\n", "step", "cold s", "warm s", "last s"
        for (i = 1; i <= n; i++) { s = order[i]
          printf "%-42s %8s %8s %8s\n", s, (s in cold ? cold[s] : "-"), (s in warm ? warm[s] : "-"),
            (s in run ? run[s] : "-") } }' "$file"
