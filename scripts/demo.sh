#!/usr/bin/env bash
# The README's first command. On a fresh machine it installs and starts the local stack
# (TimescaleDB + the nisshi broker; the first broker build takes about 10 minutes), builds
# fleetflow, creates the topic with 4 partitions, starts the HTTP gateway, sends a burst from
# 5,000 simulated servers through it (0.1% of them malformed, which the gateway rejects), runs
# the job as 2 processes x 2 workers until the topic is drained, with the alert rules of
# scripts/demo-alerts.toml and a local Alertmanager, and shows what landed and what fired.
# Safe to run again: each run adds a new burst.
#
# Env: RECORDS (default 500000), SERVERS (default 5000).
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS="${RECORDS:-500000}"
SERVERS="${SERVERS:-5000}"

scripts/prereqs.sh
scripts/stack.sh up
eval "$(scripts/stack.sh urls)"
echo "== building fleetflow (release)"
cargo build --release --quiet
bin=target/release/fleetflow
sql() { scripts/timescaledb.sh psql -X -q "$@"; }

$bin topic create --partitions 4
$bin migrate
before=$(sql -Atc "SELECT count(*) FROM metrics")

logs=target/demo && mkdir -p "$logs"
# Waits until PORT on 127.0.0.1 answers; shows LOG and stops if PID died first.
wait_for() {
  local port=$1 pid=$2 log=$3
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "nothing answers on 127.0.0.1:$port; see $log" >&2; exit 1
}
echo "== starting the HTTP ingest gateway on 127.0.0.1:58080"
FLEETFLOW_LOG=info $bin gateway --listen 127.0.0.1:58080 2>"$logs/gateway.log" &
gateway=$!
trap 'kill $gateway 2>/dev/null || true' EXIT
wait_for 58080 $gateway "$logs/gateway.log"

echo "== $SERVERS simulated servers send $RECORDS records through the gateway"
$bin loadgen --count "$RECORDS" --servers "$SERVERS" --gateway http://127.0.0.1:58080 --bad-fraction 0.001
kill -TERM $gateway && wait $gateway || true

echo "== starting Alertmanager on 127.0.0.1:59093 (Debian's prometheus-alertmanager)"
printf 'route:\n  receiver: none\n  group_wait: 1s\nreceivers:\n  - name: none\n' >"$logs/alertmanager.yml"
/usr/bin/prometheus-alertmanager --config.file="$logs/alertmanager.yml" --storage.path="$logs/alertmanager-data" \
  --web.listen-address=127.0.0.1:59093 --cluster.listen-address= >"$logs/alertmanager.log" 2>&1 &
alertmanager=$!
trap 'kill $gateway $alertmanager 2>/dev/null || true' EXIT
wait_for 59093 $alertmanager "$logs/alertmanager.log"

echo "== running the job: 2 processes x 2 workers, alert rules from scripts/demo-alerts.toml"
# The local broker keeps its topics in memory: after it restarts, the topic is new while the
# database still holds the old offsets. The job refuses such a topic unless told to start it
# over; for this local stack that is what is wanted (it acts only when the offsets do not fit
# the topic, and rows already written stay). Never a default for your own cluster.
hostfile="$logs/hostfile"
printf '127.0.0.1:%s\n' 52101 52102 >"$hostfile"
started=$(date +%s%N)
pids=()
for p in 0 1; do
  FLEETFLOW_LOG=info $bin run --processes 2 --process-id $p --hostfile "$hostfile" --workers 2 \
    --exit-when-idle 2s --on-topic-reset start-over --summary-json "$logs/summary-p$p.json" \
    --config scripts/demo-alerts.toml --alertmanager-url http://127.0.0.1:59093 2>"$logs/job-p$p.log" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
if [ "$status" != 0 ]; then
  echo "the job failed; logs:" >&2; tail -n 20 "$logs"/job-p*.log >&2; exit 1
fi
# Each process's run summary (run --summary-json), as its "job finished" log line says it.
python3 - "$logs"/summary-p*.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    with open(path) as f:
        s = json.load(f)
    na = lambda v, fmt: format(v, fmt) if v is not None else "NaN"
    print(f"  process: {s['rows_written']} rows written in {s['active_seconds']:.2f} s of work"
          f" ({s['rows_per_second']:.0f} rows/s) records_read={s['records_read']} rows_written={s['rows_written']}"
          f" dead_letters={s['dead_letters']} replayed_skipped={s['replayed_skipped']}"
          f" natural_key_duplicates={s['natural_key_duplicates']} seconds=\"{s['seconds']:.1f}\""
          f" active_seconds=\"{s['active_seconds']:.3f}\" cpu_seconds=\"{na(s['cpu_seconds'], '.2f')}\""
          f" peak_rss_mib=\"{na(s['peak_rss_mib'], '.1f')}\" latency_p50_ms={s['latency_p50_ms']}"
          f" latency_p99_ms={s['latency_p99_ms']} rows_per_second=\"{s['rows_per_second']:.0f}\"")
PY

after=$(sql -Atc "SELECT count(*) FROM metrics")
echo
echo "== what landed"
echo "  new rows: $((after - before))   (total in metrics: $after)"
echo "  job wall time incl. start-up and the 2 s idle check: $(( ($(date +%s%N) - started) / 1000000 )) ms"
sql -c "SELECT partition, next_offset, committed_at FROM fleetflow_offsets ORDER BY partition"
echo "== from the rollups: the five hottest servers of the last 5 minutes (fleetflow query top)"
$bin query top --metric cpu --window 5m --limit 5
echo "== the fleet, minute by minute (fleetflow query fleet --since 5m)"
$bin query fleet --since 5m
echo "== alerts firing (fleetflow query alerts --active; the first 10)"
$bin query alerts --active | head -n 11 || true
echo "  firing in the alerts table: $(sql -Atc "SELECT count(*) FROM alerts WHERE state = 'firing'")," \
  "in Alertmanager: $(python3 -c 'import json, urllib.request
alerts = json.load(urllib.request.urlopen("http://127.0.0.1:59093/api/v2/alerts"))
print(sum(a["status"]["state"] == "active" for a in alerts))')"
echo "logs: $logs/job-p0.log $logs/job-p1.log; run summaries (JSON): $logs/summary-p0.json $logs/summary-p1.json"
