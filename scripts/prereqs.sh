#!/usr/bin/env bash
# Build prerequisites beyond what a fresh machine of this kind has: OpenSSL headers (rdkafka's
# TLS support links the system OpenSSL), sqlite3 (tests/added_partitions.rs grows the
# broker's sqlite storage, since nisshi has no CreatePartitions), python3 (demo.sh reads the
# job's JSON run summaries, test.sh checks docker/), promtool (from Debian's `prometheus`
# package: the test command checks and unit-tests docker/prometheus/) and Alertmanager
# (Debian's `prometheus-alertmanager`: tests/alerts.rs starts its own). Idempotent.
set -euo pipefail
missing=()
for pkg in libssl-dev pkg-config sqlite3 python3; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
updated=""
if [ ${#missing[@]} -gt 0 ]; then
  echo "prereqs.sh: installing ${missing[*]}" >&2
  apt-get update -qq && updated=1 && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Only the binaries are wanted from `prometheus` and `prometheus-alertmanager`, not running
# servers: their maintainer scripts would start them (init script, or systemd unit where systemd runs). A policy-rc.d that
# answers 101 forbids service starts during the install (Debian's documented mechanism,
# honoured by invoke-rc.d and deb-systemd-invoke); ours is removed afterwards, one already
# there (container images have one) is left as it is. The service is then disabled so no
# boot starts it either. No recommends: they would add node-exporter, another server.
servers=()
for pkg in prometheus prometheus-alertmanager; do dpkg -s "$pkg" >/dev/null 2>&1 || servers+=("$pkg"); done
if [ ${#servers[@]} -gt 0 ]; then
  echo "prereqs.sh: installing ${servers[*]} (for promtool and tests; no server is started)" >&2
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/prereqs.sh: no service starts during its install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  [ -n "$updated" ] || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${servers[@]}" >/dev/null
  for service in "${servers[@]}"; do
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
      systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
    command -v update-rc.d >/dev/null && update-rc.d "$service" disable >/dev/null 2>&1 || true
  done
fi
command -v promtool >/dev/null || { echo "prereqs.sh: promtool missing after installing prometheus" >&2; exit 1; }
[ -x /usr/bin/prometheus-alertmanager ] || { echo "prereqs.sh: prometheus-alertmanager missing after installing it" >&2; exit 1; }
