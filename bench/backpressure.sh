#!/usr/bin/env bash
# Memory under backpressure: the job (2 processes x 2 workers) runs while the loadgen keeps
# producing; the database is stopped for DOWN seconds (default 60) and started again. Every
# 5 s it prints each job process's resident memory and its progress, then the peak.
# DOWN=0 keeps the database up: a soak run of the job at RATE for LENGTH seconds.
#
# Needs the local stack (scripts/stack.sh up) and a release build. Uses its own topic and
# database so it does not disturb the demo's.
set -euo pipefail
cd "$(dirname "$0")/.."
DOWN="${DOWN:-60}"
RATE="${RATE:-20000}"
eval "$(scripts/stack.sh urls)"
bin=target/release/fleetflow
stamp=$(date +%s)
export FLEETFLOW_TOPIC="bp_$stamp"
admin_url=$FLEETFLOW_DATABASE_URL
export FLEETFLOW_DATABASE_URL="${admin_url%/*}/bp_$stamp"
scripts/timescaledb.sh psql -q -c "CREATE DATABASE bp_$stamp"
$bin topic create --partitions 4 >/dev/null
logs=target/backpressure && mkdir -p $logs
printf '127.0.0.1:%s\n' 52201 52202 >$logs/hostfile
for p in 0 1; do
  FLEETFLOW_LOG=info $bin run --processes 2 --process-id $p --hostfile $logs/hostfile --workers 2 \
    --report-interval 5s --summary-json $logs/summary-p$p.json 2>$logs/job-p$p.log &
  eval "job$p=$!"
done
LENGTH="${LENGTH:-$((DOWN + 60))}"
total=$((RATE * LENGTH))
$bin loadgen --count $total --rate $RATE --servers 5000 >$logs/loadgen.log 2>&1 &
loadgen=$!
peak=0
sample() {
  local line="t=$1s"
  for pid in $job0 $job1; do
    rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
    [ "$rss" -gt "$peak" ] && peak=$rss
    line="$line  rss=$((rss / 1024))MiB"
  done
  echo "$line  $(progress $logs/summary-p0.json)"
}
# Process 0's progress from its run summary, rewritten at every --report-interval.
progress() {
  python3 - "$1" <<'PY' 2>/dev/null || echo "(no summary yet)"
import json, sys
s = json.load(open(sys.argv[1]))
state = " (waiting for the database)" if s["waiting_for_database"] else \
    " (backpressure: the database is behind)" if s["backpressured"] else ""
print(f"{s['records_read']} read, {s['rows_written']} rows written, {s['dead_letters']} dead letters,"
      f" durable epoch {s['durable_epoch']}, lag {s['lag']}{state}")
PY
}
t=0
for _ in 1 2 3; do sleep 5; t=$((t + 5)); sample $t; done
if [ "$DOWN" -gt 0 ]; then
  echo "== stopping the database for $DOWN s"
  scripts/timescaledb.sh down
  for _ in $(seq 1 $((DOWN / 5))); do sleep 5; t=$((t + 5)); sample $t; done
  echo "== starting the database"
  scripts/timescaledb.sh up
fi
while kill -0 $loadgen 2>/dev/null; do sleep 5; t=$((t + 5)); sample $t; done
for _ in 1 2 3 4 5 6; do sleep 5; t=$((t + 5)); sample $t; done
kill -TERM $job0 $job1; wait $job0 $job1 || true
echo "peak resident memory of a job process: $((peak / 1024)) MiB (produced $total records at $RATE/s)"
$bin status --database-url "$FLEETFLOW_DATABASE_URL" | tail -4
