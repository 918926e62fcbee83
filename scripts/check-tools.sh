#!/usr/bin/env bash
# Verifies that every host tool hearth needs is present and runs (not only that its
# package is marked installed). Called by install-deps.sh after installing; run it by hand
# after upgrading packages. Exits 1 naming what is broken and how to repair it.
set -uo pipefail

# tool | how to check it runs | Debian package
CHECKS=(
  "qemu-system-x86_64|qemu-system-x86_64 -version|qemu-system-x86"
  "qemu-img|qemu-img --version|qemu-utils"
  "nft|nft --version|nftables"
  "ip|ip -V|iproute2"
  "mkfs.ext4|mkfs.ext4 -V|e2fsprogs"
  "resize2fs|resize2fs -P /dev/null|e2fsprogs"
  "busybox|/bin/busybox true|busybox-static"
  "lz4|lz4 --version|lz4"
  "protoc|protoc --version|protobuf-compiler"
  "python3|python3 --version|python3"
  "file|file --version|file"
  "strip|strip --version|binutils"
  "curl|curl --version|curl"
)

broken=()
for c in "${CHECKS[@]}"; do
  IFS='|' read -r tool probe pkg <<<"$c"
  if ! command -v "${probe%% *}" >/dev/null 2>&1; then
    broken+=("$tool (missing; package $pkg)")
    continue
  fi
  # resize2fs -P on /dev/null fails by design; only "command not found"/loader errors count.
  out=$($probe 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ "$tool" != resize2fs ]; then
    broken+=("$tool (\`$probe\` failed: $(printf '%s' "$out" | head -c 200); package $pkg)")
  fi
done

if [ ${#broken[@]} -gt 0 ]; then
  echo "error: these tools are missing or do not run:" >&2
  for b in "${broken[@]}"; do echo "  - $b" >&2; done
  echo "repair with: apt-get install --reinstall <package> (as root), then re-run scripts/setup.sh" >&2
  exit 1
fi
printf '\033[1m==> %s\033[0m\n' "host tools: all ${#CHECKS[@]} present and working"
