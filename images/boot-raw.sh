#!/usr/bin/env bash
# Boot the `minimal` template directly with QEMU (no host agent) and time it.
# The kernel needs kernel/initrd.cpio (stage 1 loads virtio_blk, then switches to the disk).
#
# Usage: images/boot-raw.sh [IMAGES_DIR] [options]
#   IMAGES_DIR   default ${HEARTH_IMAGES_DIR:-/var/lib/hearth/images}
#   --runs N     boot N times (default 1) and print each time plus the average
#   --net        give the guest a NIC: a throwaway netns with tap0 169.254.0.22/30,
#                guest 169.254.0.21/30; checks GET /health from inside the netns
#   --keep       (with --net, one run) leave the VM running; prints how to reach and stop it
#   --probe      boot with hearth.probe=1 and wait for HEARTH_PROBE_OK and QEMU's exit
#   --accel A    tcg (default) or kvm
#
# Prints `boot_ms=N` per run: QEMU start to `HEARTH_GUEST_READY` on the serial console.
# This is the reference "raw boot" for the benchmarks. Run as root.
set -euo pipefail

IMAGES_DIR="${HEARTH_IMAGES_DIR:-/var/lib/hearth/images}"
if [[ $# -gt 0 && $1 != --* ]]; then IMAGES_DIR="$1"; shift; fi
RUNS=1 NET=0 KEEP=0 PROBE=0 ACCEL=tcg TIMEOUT_S=60
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --net) NET=1; shift ;;
        --keep) KEEP=1; shift ;;
        --probe) PROBE=1; shift ;;
        --accel) ACCEL="$2"; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

VMLINUX="$IMAGES_DIR/kernel/vmlinux"
ROOTFS="$IMAGES_DIR/templates/minimal/rootfs.ext4"
INITRD="$IMAGES_DIR/kernel/initrd.cpio"
[[ -f $VMLINUX && -f $ROOTFS && -f $INITRD ]] || { echo "no image in $IMAGES_DIR (run scripts/build-images.sh)" >&2; exit 1; }

CMDLINE_BASE="console=ttyS0 reboot=t panic=-1 root=/dev/vda rw rootfstype=ext4 init=/usr/bin/hearth-guest tsc_early_khz=2000000 tsc=reliable quiet"
WORK="$(mktemp -d /tmp/hearth-boot-raw.XXXXXX)"
NS=""
QPID=""

cleanup() {
    if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then kill "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true; fi
    [[ -n $NS ]] && ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
if [[ $KEEP -eq 0 ]]; then trap cleanup EXIT; fi

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

boot_once() {
    local run="$1" log="$WORK/console-$1.log" extra="hearth.hostname=raw-$1"
    local netargs=() prefix=()
    : > "$log"
    if [[ $NET -eq 1 ]]; then
        NS="hearth-raw-$$-$run"
        ip netns add "$NS"
        ip -n "$NS" link set lo up
        ip -n "$NS" tuntap add dev tap0 mode tap
        ip -n "$NS" addr add 169.254.0.22/30 dev tap0
        ip -n "$NS" link set tap0 up
        netargs=(-netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-device,netdev=n0)
        prefix=(ip netns exec "$NS")
        extra="$extra hearth.ip=169.254.0.21/30 hearth.gw=169.254.0.22"
    fi
    [[ $PROBE -eq 1 ]] && extra="$extra hearth.probe=1"
    local marker=HEARTH_GUEST_READY
    [[ $PROBE -eq 1 ]] && marker=HEARTH_PROBE_OK

    local t0; t0=$(now_ms)
    "${prefix[@]}" qemu-system-x86_64 -M microvm -accel "$ACCEL" -cpu max -m 256 -smp 1 \
        -nodefaults -no-user-config -nographic -no-reboot \
        -serial "file:$log" \
        -kernel "$VMLINUX" -initrd "$INITRD" -append "$CMDLINE_BASE $extra" \
        -drive "id=root,file=$ROOTFS,format=raw,if=none,snapshot=on" \
        -device virtio-blk-device,drive=root \
        "${netargs[@]}" </dev/null >"$WORK/qemu-$run.out" 2>&1 &
    QPID=$!
    local deadline=$(( t0 + TIMEOUT_S * 1000 ))
    until grep -q "$marker" "$log" 2>/dev/null; do
        if ! kill -0 "$QPID" 2>/dev/null; then
            echo "run $run: qemu exited before $marker; console:" >&2
            cat "$log" "$WORK/qemu-$run.out" >&2
            return 1
        fi
        if (( $(now_ms) > deadline )); then
            echo "run $run: no $marker after ${TIMEOUT_S}s; console:" >&2
            cat "$log" >&2
            return 1
        fi
        sleep 0.02
    done
    local ms=$(( $(now_ms) - t0 ))
    echo "run $run: boot_ms=$ms"
    TIMES+=("$ms")

    if [[ $PROBE -eq 1 ]]; then
        local t1; t1=$(now_ms)
        wait "$QPID" || true
        echo "run $run: qemu exited $(( $(now_ms) - t1 )) ms after the probe marker"
        QPID=""
    elif [[ $NET -eq 1 ]]; then
        local code
        code=$(ip netns exec "$NS" curl -s -m 5 -o /dev/null -w '%{http_code}' http://169.254.0.21:49983/health || true)
        echo "run $run: GET /health from netns $NS -> $code"
        [[ $code == 204 ]] || return 1
    fi
    if [[ $KEEP -eq 1 ]]; then
        echo "kept running: qemu pid $QPID, netns ${NS:-none}, console $log"
        echo "stop with: kill $QPID; ip netns del ${NS:-<none>}; rm -rf $WORK"
        return 0
    fi
    if [[ -n $QPID ]]; then kill "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true; QPID=""; fi
    if [[ -n $NS ]]; then ip netns del "$NS" 2>/dev/null || true; NS=""; fi
}

TIMES=()
for ((i = 1; i <= RUNS; i++)); do
    boot_once "$i"
done
if [[ ${#TIMES[@]} -gt 0 ]]; then
    sum=0; for t in "${TIMES[@]}"; do sum=$((sum + t)); done
    echo "boot_ms_avg=$((sum / ${#TIMES[@]})) runs=${#TIMES[@]} accel=$ACCEL"
fi
