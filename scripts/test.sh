#!/usr/bin/env bash
# The README's second command, and what CI runs: starts the local stack the tests need
# (TimescaleDB server; the tests start their own brokers from the cached nisshi build),
# checks formatting, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh
scripts/timescaledb.sh up
scripts/broker.sh install
cargo fmt --check
# docker/ cannot be run here (no Docker engine); check what can be checked.
python3 -c 'import yaml' 2>/dev/null || pip install --quiet pyyaml
python3 docker/check.py
# The pipeline's own alerting: the scrape config and rules are valid, and the rules' unit tests
# (synthetic series in, which alerts fire out) pass. promtool comes from scripts/prereqs.sh.
promtool check config docker/prometheus/prometheus.yml
promtool check rules docker/prometheus/fleetflow-rules.yml
promtool test rules docker/prometheus/fleetflow-rules.test.yml
# The integration tests each start a broker and a multi-process job: two at a time fit 2 cores.
cargo test --workspace -- --test-threads=2
