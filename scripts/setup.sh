#!/usr/bin/env bash
# One command from a fresh Debian 12 machine (as root) to a running hearth:
# installs packages, builds the guest kernel/image and the binaries, starts `hearth up`.
# Idempotent: a second run checks everything, rebuilds nothing that is current, and
# restarts hearth only when its binary changed.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${HEARTH_DATA_DIR:-/var/lib/hearth}
IMAGES_DIR=${HEARTH_IMAGES_DIR:-$DATA_DIR/images}
LOG=${HEARTH_LOG:-/var/log/hearth.log}
PIDFILE=/run/hearth/hearth.pid
URL=${HEARTH_URL:-http://127.0.0.1:7420}

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

bash scripts/install-deps.sh
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
HEARTH_IMAGES_DIR="$IMAGES_DIR" bash scripts/build-images.sh "$IMAGES_DIR"

say "Building hearth (release)"
cargo build --release --locked -p hearth-cli
new_sum=$(sha256sum target/release/hearth | cut -d' ' -f1)
old_sum=$(sha256sum /usr/local/bin/hearth 2>/dev/null | cut -d' ' -f1 || true)

CREDS="$HOME/.config/hearth/credentials.json"
had_creds=""
[ -f "$CREDS" ] && had_creds=1

running=""
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  running=$(cat "$PIDFILE")
fi

if [ -n "$running" ] && [ "$new_sum" = "$old_sum" ]; then
  say "hearth is already running (pid $running) with the current binary"
else
  if [ -n "$running" ]; then
    say "Stopping the old hearth (pid $running); its sandboxes keep running and are re-adopted"
    kill -TERM "$running"
    for _ in $(seq 1 100); do kill -0 "$running" 2>/dev/null || break; sleep 0.1; done
  fi
  install -m 0755 target/release/hearth /usr/local/bin/hearth
  mkdir -p "$(dirname "$PIDFILE")" "$DATA_DIR"
  [ -e "$LOG" ] || install -m 0640 /dev/null "$LOG"
  say "Starting hearth up (log: $LOG)"
  nohup /usr/local/bin/hearth up --data-dir "$DATA_DIR" --images-dir "$IMAGES_DIR" >>"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
fi

for _ in $(seq 1 300); do
  if curl -fsS "$URL/v1/health" >/dev/null 2>&1; then
    say "hearth is up at $URL"
    if [ -z "$had_creds" ]; then
      for _ in $(seq 1 50); do [ -f "$CREDS" ] && break; sleep 0.1; done
      if [ -f "$CREDS" ]; then
        key=$(sed -n 's/.*"api_key": *"\([^"]*\)".*/\1/p' "$CREDS")
        echo "Admin API key (shown once; stored in $CREDS, mode 0600): $key"
      fi
    fi
    echo "The CLI finds its key in $CREDS. Try: hearth sandbox create"
    exit 0
  fi
  if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "error: hearth exited during start; last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  sleep 0.2
done
echo "error: hearth did not answer on $URL within 60 s; see $LOG" >&2
exit 1
