#!/usr/bin/env bash
# The benchmark: starts the local stack, builds fleetflow (release) and runs `fleetflow bench`
# (Kafka ceiling, database ceiling, the job as 1x1, 1x2, 2x2 and 2x2 with --dedup natural-key,
# steady-state latency). Prints a table and writes bench/results-latest.json.
#
# Env: RECORDS (default 1000000). Extra arguments go to `fleetflow bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh
scripts/stack.sh up
eval "$(scripts/stack.sh urls)"
cargo build --release --quiet
target/release/fleetflow bench --records "${RECORDS:-1000000}" --output bench/results-latest.json "$@"
