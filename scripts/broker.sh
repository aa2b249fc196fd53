#!/usr/bin/env bash
# A local Kafka-protocol broker for fleetflow: nisshi 0.8.1 from crates.io (Apache Kafka
# itself cannot be downloaded here; see ../shared/notes/infrastructure.md). Built once into
# the cache (about 10 minutes on 2 cores), then reused.
#
#   scripts/broker.sh install|up|down|status|url|path
#
# Env: FLEETFLOW_CACHE (default /var/cache/fleetflow as root, else ~/.cache/fleetflow),
#      FLEETFLOW_KAFKA_PORT (default 59092),
#      FLEETFLOW_BROKER_STORAGE=memory|sqlite (default memory; sqlite survives restarts).
set -euo pipefail

if [ "$(id -u)" = 0 ]; then CACHE="${FLEETFLOW_CACHE:-/var/cache/fleetflow}"; else CACHE="${FLEETFLOW_CACHE:-$HOME/.cache/fleetflow}"; fi
VERSION=0.8.1
BINARY="$CACHE/nisshi-$VERSION/bin/nisshi"
PORT="${FLEETFLOW_KAFKA_PORT:-59092}"
RUN="$CACHE/broker-$PORT"
STORAGE="${FLEETFLOW_BROKER_STORAGE:-memory}"

die() { echo "broker.sh: $*" >&2; exit 1; }

install() {
  [ -x "$BINARY" ] && return 0
  echo "broker.sh: building nisshi $VERSION (once; about 10 minutes on 2 cores) ..." >&2
  # nisshi declares a newer rustc through a dependency but builds on this toolchain.
  # opt-level 1 instead of 3: 9.5 minutes here (sources already downloaded) against about 16,
  # and the broker was as fast in the bench (produce 600k/s against 606k/s, reads 849k/s
  # against 771k/s, same hour).
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=0 \
  cargo install --locked --ignore-rust-version "nisshi@$VERSION" --no-default-features \
    --features dynostore,libsql --root "$CACHE/nisshi-$VERSION" --target-dir "$CACHE/nisshi-target" \
    >"$CACHE/nisshi-build.log" 2>&1 || die "building nisshi failed; see $CACHE/nisshi-build.log"
  rm -rf "$CACHE/nisshi-target"
}

pid() { cat "$RUN/broker.pid" 2>/dev/null || true; }
running() { local p; p=$(pid); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

up() {
  install
  running && return 0
  mkdir -p "$RUN"
  local engine="memory://nisshi/"
  # nisshi resolves sqlite paths relative to its working directory.
  [ "$STORAGE" = sqlite ] && engine="sqlite://broker.db"
  # exec: the pid recorded is the broker's own, so `down` stops the broker (it used to record
  # a subshell's and leave the broker running).
  (cd "$RUN" && exec nohup "$BINARY" broker --listener-url "tcp://127.0.0.1:$PORT" \
     --advertised-listener-url "tcp://127.0.0.1:$PORT" --storage-engine "$engine" \
     >"$RUN/broker.log" 2>&1) &
  echo $! >"$RUN/broker.pid"
  for _ in $(seq 1 200); do
    listening && { echo "broker.sh: up at 127.0.0.1:$PORT ($STORAGE storage)" >&2; return 0; }
    running || die "nisshi exited; see $RUN/broker.log"
    sleep 0.1
  done
  die "nisshi does not listen on $PORT after 20 s; see $RUN/broker.log"
}

down() {
  running || { rm -f "$RUN/broker.pid"; return 0; }
  local p; p=$(pid)
  kill -TERM "$p"
  for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  rm -f "$RUN/broker.pid"
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) if running; then echo "running 127.0.0.1:$PORT"; else echo "stopped"; exit 3; fi ;;
  url) echo "127.0.0.1:$PORT" ;;
  path) install; echo "$BINARY" ;;
  *) die "usage: $0 install|up|down|status|url|path" ;;
esac
