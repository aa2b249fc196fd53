#!/usr/bin/env bash
# A local TimescaleDB for fleetflow: PostgreSQL 17 + timescaledb from Debian trixie packages,
# unpacked into a private prefix (bookworm has no timescaledb package; the host's apt sources
# are never touched). See ../shared/notes/infrastructure.md.
#
#   scripts/timescaledb.sh install|up|down|status|url|psql [psql args]
#
# Env: FLEETFLOW_CACHE (default /var/cache/fleetflow as root, else ~/.cache/fleetflow), FLEETFLOW_PG_PORT (default 55432),
#      FLEETFLOW_PG_DATA (default $FLEETFLOW_CACHE/pgdata-$PORT),
#      FLEETFLOW_PG_PRELOAD (default timescaledb; applies when the data dir is created),
#      FLEETFLOW_PG_LISTEN (default 127.0.0.1; another address also lets in, without a
#      password, clients on the networks the server is directly on: for test hosts on a
#      private bridge, as tests/across_hosts.rs makes; applies when the data dir is created).
set -euo pipefail

# As root the cache lives under /var/cache: the postgres user cannot enter /root.
if [ "$(id -u)" = 0 ]; then CACHE="${FLEETFLOW_CACHE:-/var/cache/fleetflow}"; else CACHE="${FLEETFLOW_CACHE:-$HOME/.cache/fleetflow}"; fi
PREFIX="$CACHE/timescaledb"
PORT="${FLEETFLOW_PG_PORT:-55432}"
DATA="${FLEETFLOW_PG_DATA:-$CACHE/pgdata-$PORT}"
# Tests set it empty to get a server on which timescaledb cannot be enabled.
PRELOAD="${FLEETFLOW_PG_PRELOAD-timescaledb}"
LISTEN="${FLEETFLOW_PG_LISTEN:-127.0.0.1}"
BIN="$PREFIX/usr/lib/postgresql/17/bin"
PG_USER=postgres

die() { echo "timescaledb.sh: $*" >&2; exit 1; }

# Packages to unpack: the server, the extension, and every library they link that
# bookworm's versions cannot satisfy (trixie's libc and friends come along, so the binaries
# run with trixie's loader, set by patchelf below).
PACKAGES=(postgresql-17 postgresql-17-timescaledb postgresql-client-17 libreadline8t64 libc6 libicu76 libssl3t64 libxml2 libzstd1
  liblz4-1 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1
  libldap2 libpq5 libsystemd0 libpam0g libaudit1 libcap-ng0 libcap2 libgcc-s1 liblzma5
  libsasl2-2 libstdc++6 libxxhash0 zlib1g libselinux1 libpcre2-8-0 libuuid1 libnuma1
  libllvm19 libgnutls30t64 libidn2-0 libunistring5 libtasn1-6 libnettle8t64 libhogweed6t64
  libgmp10 libp11-kit0 libffi8 libcrypt1 libbrotli1 libedit2 libbsd0 libmd0 libtinfo6
  liblz4-1 libzstd1)

install() {
  [ -f "$PREFIX/.installed" ] && return 0
  command -v patchelf >/dev/null || { apt-get update -qq >/dev/null; apt-get install -y -qq patchelf >/dev/null; }
  local apt="$CACHE/apt-trixie"
  mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/etc" "$apt/debs"
  cat > "$apt/etc/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SRC
  cat > "$apt/apt.conf" <<CONF
Dir::Etc::SourceList "$apt/etc/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State::Lists "$apt/lists";
Dir::State::Status "/dev/null";
Dir::Cache "$apt";
Dir::Cache::Archives "$apt/archives";
APT::Architecture "amd64";
APT::Sandbox::User "root";
CONF
  export APT_CONFIG="$apt/apt.conf"
  echo "timescaledb.sh: downloading PostgreSQL 17 + timescaledb (Debian trixie) ..." >&2
  apt-get update -qq >/dev/null || die "apt-get update for trixie failed"
  (cd "$apt/debs" && apt-get download -qq $(printf '%s\n' "${PACKAGES[@]}" | sort -u) >/dev/null) \
    || die "apt-get download failed"
  unset APT_CONFIG
  rm -rf "$PREFIX" && mkdir -p "$PREFIX"
  for deb in "$apt"/debs/*.deb; do dpkg-deb -x "$deb" "$PREFIX"; done
  # JIT would need LLVM at run time; fleetflow's queries do not need it.
  find "$PREFIX" -name 'llvmjit*' -delete
  local loader="$PREFIX/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
  [ -e "$loader" ] || loader="$PREFIX/lib64/ld-linux-x86-64.so.2"
  for f in "$BIN"/*; do
    [ -f "$f" ] && file_is_elf "$f" || continue
    patchelf --set-interpreter "$loader" --force-rpath \
      --set-rpath "$PREFIX/usr/lib/x86_64-linux-gnu:$PREFIX/usr/lib/postgresql/17/lib" "$f"
  done
  # Shared libraries (extensions) also find their dependencies in the prefix.
  for f in "$PREFIX"/usr/lib/postgresql/17/lib/*.so; do
    patchelf --force-rpath --set-rpath "$PREFIX/usr/lib/x86_64-linux-gnu:$PREFIX/usr/lib/postgresql/17/lib" "$f" 2>/dev/null || true
  done
  "$BIN/postgres" --version >/dev/null || die "the unpacked postgres does not run"
  touch "$PREFIX/.installed"
  echo "timescaledb.sh: installed into $PREFIX" >&2
}

file_is_elf() { [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ]; }

ensure_user() {
  id "$PG_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
}

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi; }

running() { [ -f "$DATA/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

up() {
  install
  running && return 0
  [ "$(id -u)" = 0 ] && ensure_user
  if [ ! -f "$DATA/PG_VERSION" ]; then
    mkdir -p "$DATA"
    [ "$(id -u)" = 0 ] && chown "$PG_USER" "$DATA"
    chmod 700 "$DATA"
    as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null \
      || die "initdb failed"
    cat >> "$DATA/postgresql.conf" <<CONF
listen_addresses = '$LISTEN'
port = $PORT
unix_socket_directories = '$DATA'
shared_preload_libraries = '$PRELOAD'
timescaledb.telemetry_level = off
max_connections = 300
max_prepared_transactions = 64
shared_buffers = 512MB
max_wal_size = 4GB
CONF
    [ "$LISTEN" = 127.0.0.1 ] || echo "host all all samenet trust" >>"$DATA/pg_hba.conf"
  fi
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 start >/dev/null \
    || die "PostgreSQL did not start; see $DATA/server.log"
  echo "timescaledb.sh: up at $(url)" >&2
}

down() {
  running || return 0
  as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
}

url() { echo "postgres://postgres@$LISTEN:$PORT/postgres"; }

# psql from the same packages, for the demo and for analysts: scripts/timescaledb.sh psql -c '...'
psql_() { install; "$BIN/psql" "$(url)" "$@"; }

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) if running; then echo "running $(url)"; else echo "stopped"; exit 3; fi ;;
  url) url ;;
  psql) shift; psql_ "$@" ;;
  *) die "usage: $0 install|up|down|status|url|psql [args]" ;;
esac
