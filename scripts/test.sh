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

# The end-to-end tests must run for real in CI: never skip them for lack of images.
export HEARTH_REQUIRE_E2E=1
say "cargo test --workspace"
cargo test --workspace --locked --no-fail-fast 2>&1
