#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the test suite (as root; idempotent, ~3 s when
# the packages are there): installs Debian's PostgreSQL server if missing (without
# Debian's default cluster), makes a new cluster under /var/lib/hearth/test/postgres
# that listens on 127.0.0.1:55432 and a Unix socket there (trust auth, loopback only,
# fsync off: test data only), starts it, and prints its admin URL as the last line of
# stdout. Progress goes to stderr. scripts/test.sh exports the URL as
# HEARTH_TEST_POSTGRES_URL; tests make a database of their own in it per test.
# Stop it with: runuser -u postgres -- "$PG_BIN/pg_ctl" -D /var/lib/hearth/test/postgres/data stop
set -euo pipefail
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'test-postgres: error: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "run as root"

DIR=/var/lib/hearth/test/postgres
PORT=${HEARTH_TEST_POSTGRES_PORT:-55432}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }
if [[ -z "$(pg_bin)" || ! -x "$(pg_bin)/initdb" ]]; then
    say "PostgreSQL server from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    # Debian's postgresql-common makes and starts a cluster on :5432 on install
    # unless told not to; the tests want only their own.
    apt-get install -y -q --no-install-recommends postgresql-common >/dev/null
    conf=/etc/postgresql-common/createcluster.conf
    if grep -q '^#\?create_main_cluster' "$conf"; then
        sed -i 's/^#\?create_main_cluster.*/create_main_cluster = false/' "$conf"
    else
        echo 'create_main_cluster = false' >> "$conf"
    fi
    apt-get install -y -q --no-install-recommends postgresql >/dev/null \
        || die "apt-get install postgresql failed"
fi
BIN="$(pg_bin)"
[[ -x $BIN/initdb ]] || die "no initdb under /usr/lib/postgresql after install"

# A cluster left running by an earlier run (same data dir) is stopped and remade:
# every run starts from no databases at all.
if [[ -f $DIR/data/postmaster.pid ]]; then
    runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
fi
rm -rf "$DIR"
mkdir -p "$DIR"
chown postgres:postgres "$DIR"
chmod 0700 "$DIR"
say "test PostgreSQL cluster in $DIR (127.0.0.1:$PORT)"
runuser -u postgres -- "$BIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 \
    --no-instructions >/dev/null
runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start -o \
    "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$DIR \
     -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" \
    >/dev/null || { cat "$DIR/server.log" >&2; die "the test PostgreSQL did not start"; }
echo "postgres://postgres@127.0.0.1:$PORT/postgres"
