#!/usr/bin/env bash
# The whole local stack: TimescaleDB and the Kafka-protocol broker.
#
#   scripts/stack.sh up|down|status|urls
#
# `eval "$(scripts/stack.sh urls)"` exports FLEETFLOW_DATABASE_URL and FLEETFLOW_BROKERS,
# which every fleetflow command reads.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

case "${1:-}" in
  up) "$here/timescaledb.sh" up && "$here/broker.sh" up ;;
  down) "$here/broker.sh" down; "$here/timescaledb.sh" down ;;
  status) echo "database: $("$here/timescaledb.sh" status || true)"; echo "broker:   $("$here/broker.sh" status || true)" ;;
  urls)
    echo "export FLEETFLOW_DATABASE_URL=$("$here/timescaledb.sh" url)"
    echo "export FLEETFLOW_BROKERS=$("$here/broker.sh" url)" ;;
  *) echo "usage: $0 up|down|status|urls" >&2; exit 1 ;;
esac
