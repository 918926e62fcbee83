#!/usr/bin/env bash
# The whole test suite from a fresh clone (as root): installs what the tests need
# (Debian packages, guest kernel and image), then runs every test, including the
# end-to-end ones that boot real VMs. It does not start a hearth server.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

bash scripts/install-deps.sh
bash scripts/install-test-deps.sh   # E2B's SDKs (Python venv, npm) for crates/cli/tests/e2b_sdk.rs
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
export HEARTH_IMAGES_DIR=${HEARTH_IMAGES_DIR:-/var/lib/hearth/images}
bash scripts/build-images.sh "$HEARTH_IMAGES_DIR"

say "cargo fmt --check, cargo clippy -D warnings"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# A throwaway PostgreSQL cluster on loopback (Debian's server, installed if missing):
# the db crate's tests and the replica test use it, and the API suite runs on it again
# below. Stopped when this script ends.
say "test PostgreSQL"
HEARTH_TEST_POSTGRES_URL="$(bash scripts/test-postgres.sh | tail -n1)"
export HEARTH_TEST_POSTGRES_URL
stop_postgres() {
    local bin
    bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
    runuser -u postgres -- "$bin/pg_ctl" -D /var/lib/hearth/test/postgres/data -m fast stop \
        >/dev/null 2>&1 || true
}
trap stop_postgres EXIT

# The end-to-end tests must run for real in CI: never skip them for lack of images.
export HEARTH_REQUIRE_E2E=1
say "cargo test --workspace"
cargo test --workspace --locked --no-fail-fast 2>&1

say "the control plane's API suite again, on PostgreSQL"
HEARTH_TEST_DATABASE=postgres cargo test -p hearth-control --locked --no-fail-fast 2>&1
