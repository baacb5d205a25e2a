#!/usr/bin/env bash
# Run a command with a throw-away PostgreSQL cluster: `tools/with-postgres.sh <command> [args...]`.
#
# When the server binaries are installed (Debian: /usr/lib/postgresql/<version>/bin, or initdb on
# PATH) a cluster is created in a temporary folder, listening only on a Unix socket there, and
# QUOTRA_TEST_POSTGRES_URL (postgresql+asyncpg://...) is exported for the command. The cluster is
# stopped and deleted afterwards, whatever happens; the command's exit code is passed through.
# Without PostgreSQL the command runs as is (the test summary then says PostgreSQL did not run).
# As root the cluster runs as the `postgres` user, since initdb refuses root.
set -uo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 <command> [args...]" >&2
  exit 64
fi

if [ -n "${QUOTRA_TEST_POSTGRES_URL:-}" ]; then
  exec "$@"  # a server was provided from outside
fi

pg_bin=""
if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
  pg_bin="$(dirname "$(command -v initdb)")"
else
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then pg_bin="$dir"; break; fi
  done
fi
if [ -z "$pg_bin" ]; then
  echo "with-postgres: PostgreSQL server binaries not found; running without PostgreSQL" >&2
  exec "$@"
fi

run_as=()
if [ "$(id -u)" = 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    echo "with-postgres: running as root and there is no 'postgres' user; running without PostgreSQL" >&2
    exec "$@"
  fi
  if command -v runuser >/dev/null 2>&1; then run_as=(runuser -u postgres --); else run_as=(su postgres -s /bin/sh -c); fi
fi

as_pg() {
  if [ "${#run_as[@]}" -eq 0 ]; then
    "$@"
  elif [ "${run_as[0]}" = runuser ]; then
    "${run_as[@]}" "$@"
  else
    "${run_as[@]}" "$(printf '%q ' "$@")"
  fi
}

tmp="$(mktemp -d "${TMPDIR:-/tmp}/quotra-pg.XXXXXX")"
chmod 755 "$tmp"
mkdir -p "$tmp/data" "$tmp/sock"
if [ "${#run_as[@]}" -gt 0 ]; then chown -R postgres "$tmp"; fi
chmod 700 "$tmp/data"

cleanup() {
  as_pg "$pg_bin/pg_ctl" -D "$tmp/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

user=quotra
if ! as_pg "$pg_bin/initdb" -D "$tmp/data" -U "$user" -A trust -E UTF8 --no-sync >"$tmp/initdb.log" 2>&1; then
  echo "with-postgres: initdb failed; running without PostgreSQL" >&2
  sed 's/^/  initdb: /' "$tmp/initdb.log" >&2
  "$@"
  exit $?
fi
# Unix socket only (no TCP port to collide with), no durability: it is thrown away.
opts="-c listen_addresses='' -c unix_socket_directories='$tmp/sock' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
if ! as_pg "$pg_bin/pg_ctl" -D "$tmp/data" -o "$opts" -l "$tmp/server.log" -w -t 60 start >/dev/null 2>&1; then
  echo "with-postgres: the server did not start; running without PostgreSQL" >&2
  sed 's/^/  postgres: /' "$tmp/server.log" >&2 || true
  "$@"
  exit $?
fi

version="$("$pg_bin/pg_ctl" --version 2>/dev/null | awk '{print $3}')"
echo "with-postgres: PostgreSQL ${version} running in $tmp" >&2
export QUOTRA_TEST_POSTGRES_URL="postgresql+asyncpg://${user}@/postgres?host=${tmp}/sock"
"$@"
exit $?
