#!/usr/bin/env bash
# What the E2B SDK tests need (idempotent, fast when already done), as root:
#   - a venv at /var/lib/hearth/test/e2b-venv with E2B's Python SDK and pytest (pinned
#     in tests/e2b/python/requirements.txt), remade only when the pins change;
#   - Node.js (the machine's, else Debian's) and E2B's npm SDK, pinned by
#     tests/e2b/node/package-lock.json, installed with `npm ci` when the lock changes.
# Called by scripts/test.sh; never starts a server.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'install-test-deps: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root"

VENV=/var/lib/hearth/test/e2b-venv
REQ="$REPO/tests/e2b/python/requirements.txt"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ -x $VENV/bin/python3 && "$(cat "$STAMP" 2>/dev/null)" == "$want" ]]; then
    say "E2B Python SDK venv up to date ($VENV)"
else
    say "E2B Python SDK venv: $VENV ($(tr '\n' ' ' < "$REQ"))"
    # Built where it will live (a venv's scripts name their own path); the stamp is
    # written last, so a failed install is redone on the next run.
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ" \
        || die "pip install of $REQ failed"
    echo "$want" > "$STAMP"
fi

node_ok() {
    command -v node >/dev/null && command -v npm >/dev/null || return 1
    # E2B's npm SDK wants Node >= 20.18.1.
    node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a==20&&b>=18)?0:1)'
}
if ! node_ok; then
    say "Node.js from Debian's packages"
    apt-get install -y -q --no-install-recommends nodejs npm >/dev/null \
        || die "apt-get install nodejs npm failed"
    node_ok || echo "install-test-deps: warning: Node $(node --version) is older than E2B's SDK asks for" >&2
fi
NODE_DIR="$REPO/tests/e2b/node"
LOCK_SHA="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
if [[ -d $NODE_DIR/node_modules/e2b && "$(cat "$NODE_DIR/node_modules/.lock.sha256" 2>/dev/null)" == "$LOCK_SHA" ]]; then
    say "E2B npm SDK up to date ($NODE_DIR/node_modules)"
else
    say "E2B npm SDK: npm ci in $NODE_DIR"
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci failed"
    echo "$LOCK_SHA" > "$NODE_DIR/node_modules/.lock.sha256"
fi
