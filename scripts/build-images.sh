#!/usr/bin/env bash
# Build hearth's guest kernel and the `minimal` and `python` templates.
#
# Usage: scripts/build-images.sh [IMAGES_DIR]
#   IMAGES_DIR defaults to ${HEARTH_IMAGES_DIR:-/var/lib/hearth/images}.
#
# Runs as root. Idempotent: every step is skipped when its outputs are up to date, so a
# second run costs a cargo no-op build and a few checksums.
#
# Output (see docs/contracts.md):
#   kernel/vmlinux, kernel/release
#   kernel/initrd.cpio   initramfs: hearth-guest as /init + the virtio modules. The Debian
#                        cloud kernel has virtio_blk as a module, so root=/dev/vda can only be
#                        mounted after stage 1 loads it; pass it to QEMU with -initrd.
#   templates/minimal/rootfs.ext4, templates/minimal/template.json
#   templates/python/rootfs.ext4, templates/python/template.json (Debian bookworm via mmdebstrap)
#
# REQUIRED_PACKAGES="busybox-static mmdebstrap e2fsprogs lz4 python3 file binutils apt dpkg"
# (images/boot-raw.sh also needs qemu-system-x86, iproute2 and curl)
# (plus a Rust toolchain with the x86_64-unknown-linux-gnu target, and protobuf-compiler
# for the workspace build)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGES_DIR="${1:-${HEARTH_IMAGES_DIR:-/var/lib/hearth/images}}"
CACHE="$IMAGES_DIR/.cache"
KDIR="$IMAGES_DIR/kernel"
TEMPLATE=minimal
TDIR="$IMAGES_DIR/templates/$TEMPLATE"
ROOTFS_SIZE_MB="${HEARTH_MINIMAL_SIZE_MB:-64}"
MODULES=(virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net)
# Bump when the layout of the minimal rootfs changes so existing images get rebuilt.
ROOTFS_LAYOUT_VERSION=1

T0=$(date +%s%N)
log() {
    local ms=$(( ($(date +%s%N) - T0) / 1000000 ))
    printf '[build-images %d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"
}
die() { printf '[build-images] error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root"
for tool in apt-cache apt-get dpkg-deb lz4 mkfs.ext4 dumpe2fs python3 file sha256sum strip cargo; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
BUSYBOX="$(command -v busybox || true)"
[[ -x /bin/busybox ]] && BUSYBOX=/bin/busybox
[[ -n $BUSYBOX ]] || die "busybox missing (install busybox-static)"
file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not static (install busybox-static)"

mkdir -p "$CACHE" "$KDIR" "$TDIR"

# ---------------------------------------------------------------- kernel
PKG="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
[[ -n $PKG ]] || die "cannot resolve the package behind linux-image-cloud-amd64 (apt-get update?)"
RELEASE="${PKG#linux-image-}"
log "kernel package $PKG (release $RELEASE)"
KROOT="$CACHE/$PKG"

if [[ ! -d $KROOT/lib/modules/$RELEASE ]]; then
    log "downloading $PKG"
    rm -rf "$CACHE/dl" && mkdir -p "$CACHE/dl"
    (cd "$CACHE/dl" && apt-get -o APT::Sandbox::User=root download -q "$PKG" >/dev/null)
    deb="$(ls "$CACHE"/dl/*.deb | head -n1)"
    rm -rf "$KROOT.tmp" && mkdir -p "$KROOT.tmp"
    dpkg-deb -x "$deb" "$KROOT.tmp"
    rm -rf "$KROOT" && mv "$KROOT.tmp" "$KROOT"
    rm -rf "$CACHE/dl"
else
    log "kernel package cached"
fi

if [[ -s $KDIR/vmlinux && "$(cat "$KDIR/release" 2>/dev/null)" == "$RELEASE" ]]; then
    log "kernel/vmlinux up to date"
else
    BZ="$KROOT/boot/vmlinuz-$RELEASE"
    [[ -f $BZ ]] || die "no $BZ in package"
    log "extracting ELF vmlinux from $BZ"
    # The protected-mode code starts at (setup_sects+1)*512; the compressed payload
    # (an LZ4 legacy-frame stream followed by a 4-byte size) sits at payload_offset
    # (u32 at 0x248) relative to it, payload_length (u32 at 0x24c) long.
    python3 - "$BZ" "$CACHE/payload.lz4" <<'PY'
import struct, sys
data = open(sys.argv[1], 'rb').read()
if data[0x202:0x206] != b'HdrS':
    sys.exit('not a bzImage (no HdrS magic)')
setup_sects = data[0x1f1] or 4
pm = (setup_sects + 1) * 512
off, length = struct.unpack_from('<II', data, 0x248)
payload = data[pm + off: pm + off + length]
if payload[:4] != b'\x02\x21\x4c\x18':
    sys.exit('payload is not an LZ4 legacy frame (magic %s)' % payload[:4].hex())
# Drop the trailing little-endian uncompressed size the kernel build appends.
open(sys.argv[2], 'wb').write(payload[:-4])
PY
    rm -f "$KDIR/vmlinux.tmp"
    lz4 -d -q -f "$CACHE/payload.lz4" "$KDIR/vmlinux.tmp" || [[ -s $KDIR/vmlinux.tmp ]] \
        || die "lz4 decompression failed"
    rm -f "$CACHE/payload.lz4"
    [[ "$(head -c4 "$KDIR/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" == "7f454c46" ]] \
        || die "decompressed kernel is not ELF"
    file "$KDIR/vmlinux.tmp" | grep -q 'ELF 64-bit' || die "decompressed kernel is not ELF64"
    mv "$KDIR/vmlinux.tmp" "$KDIR/vmlinux"
    echo "$RELEASE" > "$KDIR/release.tmp" && mv "$KDIR/release.tmp" "$KDIR/release"
    log "kernel/vmlinux written ($(stat -c %s "$KDIR/vmlinux") bytes)"
fi

# ---------------------------------------------------------------- guest agent
log "building hearth-guest (static)"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
(cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -q --release -p hearth-guest --target x86_64-unknown-linux-gnu) \
    || die "cargo build of hearth-guest failed"
AGENT="$TARGET_DIR/x86_64-unknown-linux-gnu/release/hearth-guest"
[[ -x $AGENT ]] || die "built agent not found at $AGENT"
file "$AGENT" | grep -Eq 'statically linked|static-pie linked' || die "$AGENT is not statically linked"
# Install a stripped copy (symbols are a third of the file); its sha256 is what is recorded.
if [[ ! -s $CACHE/hearth-guest || $AGENT -nt $CACHE/hearth-guest ]]; then
    strip -s -o "$CACHE/hearth-guest.tmp" "$AGENT" && mv "$CACHE/hearth-guest.tmp" "$CACHE/hearth-guest"
fi
AGENT="$CACHE/hearth-guest"
AGENT_SHA="$(sha256sum "$AGENT" | cut -d' ' -f1)"
log "hearth-guest $(stat -c %s "$AGENT") bytes (stripped), sha256 $AGENT_SHA"

# ---------------------------------------------------------------- modules (shared by initrd + rootfs)
MODSRC="$KROOT/lib/modules/$RELEASE"
MODSTAGE="$CACHE/modules-$RELEASE"
if [[ ! -f $MODSTAGE/load-order ]]; then
    rm -rf "$MODSTAGE.tmp" && mkdir -p "$MODSTAGE.tmp"
    : > "$MODSTAGE.tmp/load-order"
    for m in "${MODULES[@]}"; do
        f="$(find "$MODSRC" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n1)"
        if [[ -z $f ]]; then
            log "module $m not found (built in?), skipped"
            continue
        fi
        case "$f" in
            *.ko) cp "$f" "$MODSTAGE.tmp/$m.ko" ;;
            *.ko.xz) xz -dc "$f" > "$MODSTAGE.tmp/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" > "$MODSTAGE.tmp/$m.ko" ;;
            *.ko.gz) gzip -dc "$f" > "$MODSTAGE.tmp/$m.ko" ;;
        esac
        echo "$m.ko" >> "$MODSTAGE.tmp/load-order"
    done
    rm -rf "$MODSTAGE" && mv "$MODSTAGE.tmp" "$MODSTAGE"
fi
log "modules: $(tr '\n' ' ' < "$MODSTAGE/load-order")"

# ---------------------------------------------------------------- initrd
INITRD_STAMP="agent=$AGENT_SHA kernel=$RELEASE"
if [[ -s $KDIR/initrd.cpio && "$(cat "$KDIR/.initrd-stamp" 2>/dev/null)" == "$INITRD_STAMP" ]]; then
    log "kernel/initrd.cpio up to date"
else
    IST="$CACHE/stage-initrd"
    rm -rf "$IST" && mkdir -p "$IST"/{dev,proc,newroot,lib/modules/hearth}
    install -m 0755 "$AGENT" "$IST/init"
    cp "$MODSTAGE"/* "$IST/lib/modules/hearth/"
    (cd "$IST" && find . | sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) > "$KDIR/initrd.cpio.tmp"
    mv "$KDIR/initrd.cpio.tmp" "$KDIR/initrd.cpio"
    echo "$INITRD_STAMP" > "$KDIR/.initrd-stamp"
    rm -rf "$IST"
    log "kernel/initrd.cpio written ($(stat -c %s "$KDIR/initrd.cpio") bytes)"
fi

# ---------------------------------------------------------------- minimal template
SCRIPT_SHA="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
STAMP="agent=$AGENT_SHA kernel=$RELEASE layout=$ROOTFS_LAYOUT_VERSION busybox=$(sha256sum "$BUSYBOX" | cut -c1-16) size=$ROOTFS_SIZE_MB script=$SCRIPT_SHA"
if [[ -s $TDIR/rootfs.ext4 && -s $TDIR/template.json && "$(cat "$TDIR/.stamp" 2>/dev/null)" == "$STAMP" ]]; then
    log "templates/$TEMPLATE up to date"
else
    log "building templates/$TEMPLATE rootfs (${ROOTFS_SIZE_MB} MiB)"
    STAGE="$CACHE/stage-$TEMPLATE"
    rm -rf "$STAGE" && mkdir -p "$STAGE"
    (
        cd "$STAGE"
        mkdir -p bin sbin usr/bin usr/sbin etc proc sys dev run tmp root home/user \
            lib/modules/hearth var/tmp mnt
        chmod 1777 tmp var/tmp
        chmod 0700 root
        install -m 0755 "$BUSYBOX" bin/busybox
        # Equivalent of `busybox --install -s`, done in the staging dir.
        "$BUSYBOX" --list-full | while read -r applet; do
            [[ -e $applet || -L $applet ]] && continue
            mkdir -p "$(dirname "$applet")"
            ln -s /bin/busybox "$applet"
        done
        install -m 0755 "$AGENT" usr/bin/hearth-guest
        chown 1000:1000 home/user
        cat > etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
        cat > etc/group <<'EOF'
root:x:0:
user:x:1000:
nogroup:x:65534:
EOF
        printf 'root::0:0:99999:7:::\nuser::0:0:99999:7:::\n' > etc/shadow
        chmod 0600 etc/shadow
        echo hearth > etc/hostname
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\thearth\n' > etc/hosts
        printf 'hosts: files dns\n' > etc/nsswitch.conf
        : > etc/resolv.conf
    )
    # Virtio modules, flat, plus their load order (also in the initrd).
    cp "$MODSTAGE"/* "$STAGE/lib/modules/hearth/"

    TMPIMG="$TDIR/rootfs.ext4.tmp"
    rm -f "$TMPIMG"
    truncate -s "${ROOTFS_SIZE_MB}M" "$TMPIMG"
    # The guest grows this filesystem online to the sandbox's disk size at boot
    # (EXT4_IOC_RESIZE_FS), which needs resize_inode (mkfs's default; checked below).
    # `-T default`: 4 KiB blocks and 16 KiB per inode, as on the large disk it becomes;
    # mkfs would pick its "small" type (1 KiB blocks, 4 KiB per inode) for 64 MiB,
    # which wastes ~6% of a grown disk on inode tables and slows the grow.
    mkfs.ext4 -q -F -T default -L hearth-root -m 0 -E root_owner=0:0 -d "$STAGE" "$TMPIMG" \
        || die "mkfs.ext4 failed"
    [[ "$(dumpe2fs -h "$TMPIMG" 2>/dev/null)" == *"features:"*resize_inode* ]] \
        || die "rootfs lacks resize_inode: the guest could not grow it online"
    mv "$TMPIMG" "$TDIR/rootfs.ext4"
    SIZE="$(stat -c %s "$TDIR/rootfs.ext4")"
    cat > "$TDIR/template.json.tmp" <<EOF
{"name":"$TEMPLATE","kernel_release":"$RELEASE","size_bytes":$SIZE,"built_at":"$(date -u +%Y-%m-%dT%H:%M:%SZ)","guest_agent_sha256":"$AGENT_SHA"}
EOF
    mv "$TDIR/template.json.tmp" "$TDIR/template.json"
    echo "$STAMP" > "$TDIR/.stamp"
    rm -rf "$STAGE"
    log "templates/$TEMPLATE/rootfs.ext4 written ($SIZE bytes)"
fi

# ---------------------------------------------------------------- python template
# Debian bookworm from Debian's packages (mmdebstrap, no container registry), with the
# guest agent, for programs written against E2B's SDKs (which start every command as
# `/bin/bash -l -c CMD`, as user `user`). The root tarball is cached by package list,
# so a guest-agent change re-packs in seconds instead of downloading again.
PY_TEMPLATE=python
PY_TDIR="$IMAGES_DIR/templates/$PY_TEMPLATE"
PY_SUITE=bookworm
PY_PACKAGES="python3,python3-pip,python3-venv,bash,coreutils,curl,git,procps,ca-certificates,less,iproute2,sudo"
PY_DPKG_OPTS=(
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
)
# Bump when the layout below changes.
PY_LAYOUT_VERSION=2
PY_KEY="$(printf '%s|%s|%s' "$PY_SUITE" "$PY_PACKAGES" "${PY_DPKG_OPTS[*]}" | sha256sum | cut -c1-16)"
PY_TAR="$CACHE/python-root-$PY_KEY.tar"
PY_STAMP="agent=$AGENT_SHA kernel=$RELEASE layout=$PY_LAYOUT_VERSION root=$PY_KEY"
if [[ -s $PY_TDIR/rootfs.ext4 && -s $PY_TDIR/template.json && "$(cat "$PY_TDIR/.stamp" 2>/dev/null)" == "$PY_STAMP" ]]; then
    log "templates/$PY_TEMPLATE up to date"
else
    command -v mmdebstrap >/dev/null || die "mmdebstrap missing (scripts/install-deps.sh installs it)"
    if [[ ! -s $PY_TAR ]]; then
        log "mmdebstrap $PY_SUITE (minbase + $PY_PACKAGES): about a minute"
        rm -f "$CACHE"/python-root-*.tar "$CACHE/python-root.tmp.tar"
        mmdebstrap --quiet --variant=minbase --include="$PY_PACKAGES" "${PY_DPKG_OPTS[@]}" \
            "$PY_SUITE" "$CACHE/python-root.tmp.tar" || die "mmdebstrap failed"
        mv "$CACHE/python-root.tmp.tar" "$PY_TAR"
    else
        log "python root tarball cached ($PY_KEY)"
    fi
    log "building templates/$PY_TEMPLATE rootfs"
    STAGE="$CACHE/stage-$PY_TEMPLATE"
    rm -rf "$STAGE" && mkdir -p "$STAGE"
    tar -xpf "$PY_TAR" -C "$STAGE" --numeric-owner
    (
        cd "$STAGE"
        install -m 0755 "$AGENT" usr/bin/hearth-guest
        mkdir -p lib/modules/hearth home/user
        # The SDK's default user, with a login shell that reads /etc/profile.
        grep -q '^user:' etc/passwd || echo 'user:x:1000:1000:user:/home/user:/bin/bash' >> etc/passwd
        grep -q '^user:' etc/group || echo 'user:x:1000:' >> etc/group
        grep -q '^user:' etc/shadow || echo 'user:*:19000:0:99999:7:::' >> etc/shadow
        sed -i 's|^root:x:0:0:root:/root:.*|root:x:0:0:root:/root:/bin/bash|' etc/passwd
        # As on E2B: `user` may use sudo without a password (inside its own sandbox).
        mkdir -p etc/sudoers.d
        echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > etc/sudoers.d/user
        chmod 0440 etc/sudoers.d/user
        cp -a etc/skel/. home/user/ 2>/dev/null || true
        chown -R 1000:1000 home/user
        # Commands and files run as `user` (in /home/user) unless a request names
        # another user: what E2B's SDKs expect (crates/guest/src/state.rs).
        mkdir -p etc/hearth
        echo '{"default_user": "user"}' > etc/hearth/guest.json
        echo hearth > etc/hostname
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\thearth\n' > etc/hosts
        # Not the build host's resolvers: sandboxes have no egress.
        rm -f etc/resolv.conf && : > etc/resolv.conf
        : > etc/machine-id
    )
    cp "$MODSTAGE"/* "$STAGE/lib/modules/hearth/"
    USED_MB=$(du -sm --apparent-size "$STAGE" | cut -f1)
    # Content + a quarter + 64 MiB for inode tables and first writes; the guest grows
    # it to the sandbox's disk size at boot.
    PY_SIZE_MB=$(( USED_MB + USED_MB / 4 + 64 ))
    TMPIMG="$PY_TDIR/rootfs.ext4.tmp"
    mkdir -p "$PY_TDIR"
    rm -f "$TMPIMG"
    truncate -s "${PY_SIZE_MB}M" "$TMPIMG"
    mkfs.ext4 -q -F -T default -L hearth-root -m 0 -E root_owner=0:0 -d "$STAGE" "$TMPIMG" \
        || die "mkfs.ext4 of the python template failed"
    [[ "$(dumpe2fs -h "$TMPIMG" 2>/dev/null)" == *"features:"*resize_inode* ]] \
        || die "python rootfs lacks resize_inode: the guest could not grow it online"
    mv "$TMPIMG" "$PY_TDIR/rootfs.ext4"
    SIZE="$(stat -c %s "$PY_TDIR/rootfs.ext4")"
    printf '{"name":"%s","kernel_release":"%s","size_bytes":%s,"built_at":"%s","guest_agent_sha256":"%s"}\n' \
        "$PY_TEMPLATE" "$RELEASE" "$SIZE" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$AGENT_SHA" \
        > "$PY_TDIR/template.json.tmp"
    mv "$PY_TDIR/template.json.tmp" "$PY_TDIR/template.json"
    echo "$PY_STAMP" > "$PY_TDIR/.stamp"
    rm -rf "$STAGE"
    log "templates/$PY_TEMPLATE/rootfs.ext4 written ($SIZE bytes, ${PY_SIZE_MB} MiB)"
fi

log "done: $IMAGES_DIR"
