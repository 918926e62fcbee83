#!/usr/bin/env bash
# Installs the Debian packages hearth needs on a host (idempotent, fast when already done).
# Usage: scripts/install-deps.sh          (as root, Debian 12)
set -euo pipefail

PACKAGES=(
  qemu-system-x86      # the VMM (QEMU microvm); KVM when usable, else TCG
  qemu-utils           # qemu-img: qcow2 copy-on-write root disks
  busybox-static       # userland of the `minimal` template
  mmdebstrap           # the `python` template: Debian bookworm from Debian's packages
  e2fsprogs            # mkfs.ext4 -d: template images built without mounting
  lz4                  # the Debian kernel's bzImage payload is LZ4
  protobuf-compiler    # protoc, for connectrpc-build
  libprotobuf-dev      # google/protobuf/*.proto well-known types
  nftables             # per-sandbox NAT and egress policy
  iproute2             # network namespaces, veth, tap
  ca-certificates
  curl
  jq                   # the README's API example reads the key with it
  pkg-config
  python3              # build-images.sh parses the kernel's setup header
  python3-venv         # the venv of the OpenAPI fuzzer (schemathesis, below)
  file                 # build-images.sh checks what it extracted
  binutils             # strip, for the static guest agent
)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "error: run as root (it installs Debian packages): sudo $0" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  say "Debian packages: all ${#PACKAGES[@]} present"
else
  say "Installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # apt may remove a package while installing another (a newer qemu-utils from backports
  # conflicts with bookworm's qemu-system-x86): install whatever is missing now, once more.
  again=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || again+=("$p")
  done
  if [ ${#again[@]} -gt 0 ]; then
    say "apt removed ${again[*]} while installing; installing again"
    apt-get install -y -q --no-install-recommends "${again[@]}"
  fi
fi
bash "$(dirname "$0")/check-tools.sh"

if ! command -v cargo >/dev/null 2>&1; then
  for d in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && export PATH="$d:$PATH"
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found. Install Rust >= 1.88 with rustup (https://rustup.rs), then re-run." >&2
  exit 1
fi
say "Rust: $(cargo --version)"

# The OpenAPI fuzzer of the test suite (crates/cli/tests/fuzz.rs): schemathesis from PyPI,
# pinned, in a venv of its own so it never touches Debian's Python packages.
SCHEMATHESIS_VERSION=4.32.5
VENV=${HEARTH_VENV:-/opt/hearth/venv}
if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null)" = "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
  say "schemathesis $SCHEMATHESIS_VERSION: present in $VENV"
else
  say "Installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  rm -rf "$VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
  "$VENV/bin/schemathesis" --version
fi
