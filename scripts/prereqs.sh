#!/usr/bin/env bash
# Build prerequisites beyond what a fresh machine of this kind has: OpenSSL headers (rdkafka's
# TLS support links the system OpenSSL), sqlite3 (tests/added_partitions.rs grows the
# broker's sqlite storage, since nisshi has no CreatePartitions), and python3 (demo.sh reads
# the job's JSON run summaries, test.sh checks docker/). Idempotent.
set -euo pipefail
missing=()
for pkg in libssl-dev pkg-config sqlite3 python3; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "prereqs.sh: installing ${missing[*]}" >&2
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
