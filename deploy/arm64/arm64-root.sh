#!/bin/sh
# An arm64 Debian bookworm root with the slmfleet agent installed by deploy/install-agent.sh, run here under
# qemu-user emulation (binfmt_misc + qemu-aarch64-static). What emulation tells and does not: see
# docs/ARCHITECTURE.md, "The agent on arm64 under emulation".
#
#   sudo deploy/arm64/arm64-root.sh build           build or reuse the root; print its path (last line)
#   sudo deploy/arm64/arm64-root.sh binfmt          only step 1 below (fails, saying why, where it cannot)
#   sudo deploy/arm64/arm64-root.sh run ROOT CMD..  run CMD in ROOT (chroot with /proc, /sys, /dev, in a
#                                                   private mount namespace: nothing stays mounted)
#   QEMU_CPU=max ... run ROOT CMD..                 another CPU for qemu to emulate (default cortex-a72, a
#                                                   Raspberry Pi 4's core; "max" adds SVE, dot product, ...)
#
# build:
#   1. registers qemu-aarch64 with binfmt_misc (mounting /proc/sys/fs/binfmt_misc when needed)
#   2. mmdebstrap --arch=arm64 bookworm with python3, python3-venv, ca-certificates and systemd, then runs the
#      real installer inside it: deploy/install-agent.sh --no-start (venv + pip install of the agent with its
#      aarch64 wheels from PyPI; SYSTEMD_OFFLINE=1, as in any image build: systemctl enables the unit and
#      skips daemon-reload, there being no systemd running in the root)
#   3. installs this checkout's code (a wheel, --no-deps --force-reinstall) when it differs from the last one
# The root is cached in CACHE (default /var/cache/slmfleet/arm64-rootfs, env SLMFLEET_ARM64_CACHE) as
# root-<hash of the recipe here, the installer, the unit and the agent's dependencies>; other roots there are
# removed.
# Needs root, mmdebstrap and qemu-user-static (apt-get install mmdebstrap qemu-user-static; 'make setup-test'
# installs them when run as root). The host's own CAs (/usr/local/share/ca-certificates) are trusted in the root
# too, so pip works behind the same TLS-inspecting proxy as the host. BUILD_PYTHON (default python3; 3.11 or newer,
# with pip) builds the checkout's wheel on the host.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE="${SLMFLEET_ARM64_CACHE:-/var/cache/slmfleet/arm64-rootfs}"
RECIPE=1
SUITE="bookworm"
MIRROR="http://deb.debian.org/debian"
PACKAGES="python3,python3-venv,ca-certificates,systemd"
DEVICE_ID="arm64-device"
BINFMT_CONF="/usr/lib/binfmt.d/qemu-aarch64.conf"
BUILD_PYTHON="${BUILD_PYTHON:-python3}"

die() { echo "arm64-root: $*" >&2; exit 1; }
say() { echo "arm64-root: $*" >&2; }

usage() { sed -n '2,/^set -eu/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

need_root() { [ "$(id -u)" -eq 0 ] || die "run as root (binfmt_misc, chroot and mmdebstrap need it)"; }

# 1. binfmt_misc: arm64 ELF files run through qemu-aarch64-static (flag F: also inside the chroot).
ensure_binfmt() {
    command -v qemu-aarch64-static >/dev/null 2>&1 || die "qemu-aarch64-static not found (apt-get install qemu-user-static)"
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
            || die "binfmt_misc is not mounted and cannot be (a container without it cannot run foreign binaries)"
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        [ -r "$BINFMT_CONF" ] || die "$BINFMT_CONF missing (apt-get install qemu-user-static)"
        cat "$BINFMT_CONF" > /proc/sys/fs/binfmt_misc/register || die "cannot register qemu-aarch64 with binfmt_misc"
    fi
    grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || die "qemu-aarch64 is registered without the F flag: it cannot run inside a chroot"
    grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "qemu-aarch64 binfmt entry is disabled"
}

# The checkout's files that go into the wheel, copied so that building leaves the checkout alone.
stage_source() {
    mkdir -p "$1"
    (cd "$REPO" && tar cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
        pyproject.toml README.md wire slmfleet agent controller simulations benchmarks) | (cd "$1" && tar xf -)
}

source_hash() {
    (cd "$1" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
}

# What the root is made of: the recipe (bump RECIPE when build_root changes), the installer, the unit and the
# agent's dependencies. The checkout's code is not in it (refresh_agent installs that).
root_key() {
    {
        echo "$RECIPE $SUITE $MIRROR $PACKAGES $DEVICE_ID"
        cat "$REPO/deploy/install-agent.sh" "$REPO/deploy/systemd/slmfleet-agent.service"
        "$BUILD_PYTHON" -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; print(p["dependencies"], p["optional-dependencies"]["agent"])' "$REPO/pyproject.toml"
    } | sha256sum | cut -c1-16
}

build_wheel() {  # build_wheel SRC OUT: the slmfleet wheel of SRC in OUT
    "$BUILD_PYTHON" -m pip wheel --quiet --no-deps -w "$2" "$1" >&2 || die "cannot build the slmfleet wheel"
}

# An arm64 /proc/cpuinfo (a Cortex-A72, as on a Raspberry Pi 4; one entry per host CPU). qemu 7.2 shows the
# guest the host's x86 one, and onnxruntime's CPU detection (pytorch/cpuinfo) then crashes while it loads
# (SIGSEGV); a real board has its own.
arm64_cpuinfo() {
    i=0
    while [ "$i" -lt "$(nproc)" ]; do
        printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
        i=$((i + 1))
    done
}

# run ROOT CMD...: CMD inside ROOT, with /proc (its cpuinfo an arm64 one), /sys and /dev mounted in a private
# mount namespace (gone on exit), a clean environment (the host's PIP_* and the like stay out), qemu emulating a
# Cortex-A72 unless QEMU_CPU says otherwise, and the caller's PID (every step execs).
run_in_root() {
    root=$1
    shift
    [ -x "$root/usr/bin/python3" ] || die "$root is not an arm64 root built by '$0 build'"
    mkdir -p "$root/etc/slmfleet-emulation"
    arm64_cpuinfo > "$root/etc/slmfleet-emulation/cpuinfo"
    exec unshare --mount --propagation private -- sh -c '
        r=$1; shift
        export QEMU_CPU="${QEMU_CPU:-cortex-a72}"  # for the root'"'"'s env too, an arm64 program
        mount -t proc proc "$r/proc" && mount --bind "$r/etc/slmfleet-emulation/cpuinfo" "$r/proc/cpuinfo" \
            && mount --rbind /sys "$r/sys" && mount --rbind /dev "$r/dev" || exit 1
        exec chroot "$r" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 QEMU_CPU="$QEMU_CPU" "$@"' sh "$root" "$@"
}

build_root() {  # build_root TARGET STAGE: Debian + the installer into TARGET
    target=$1
    stage=$2
    command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap not found (apt-get install mmdebstrap)"
    mkdir -p "$stage/deploy"
    cp -a "$REPO/deploy/install-agent.sh" "$REPO/deploy/systemd" "$stage/deploy/"
    wheel=$(cd "$stage/dist" && ls slmfleet-*.whl)
    say "building $target (mmdebstrap $SUITE arm64, then deploy/install-agent.sh; several minutes)"
    # shellcheck disable=SC2016 # $1 is mmdebstrap's, expanded in its hooks
    mmdebstrap --arch=arm64 --variant=apt --include="$PACKAGES" \
        --customize-hook='mkdir -p "$1/usr/local/share/ca-certificates" "$1/tmp/slmfleet-install"' \
        --customize-hook='if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/"; fi' \
        --customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
        --customize-hook="cp -a '$stage/.' \"\$1/tmp/slmfleet-install/\"" \
        --customize-hook="chroot \"\$1\" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            SYSTEMD_OFFLINE=1 sh /tmp/slmfleet-install/deploy/install-agent.sh --no-start --device-id $DEVICE_ID \
            --package '/tmp/slmfleet-install/dist/$wheel[agent]'" \
        --customize-hook='rm -rf "$1/tmp/slmfleet-install"' \
        "$SUITE" "$target" "deb $MIRROR $SUITE main" "deb $MIRROR-security $SUITE-security main" >&2 \
        || die "mmdebstrap or the installer failed (see above)"
}

# Install the checkout's code when it is not the one installed (the dependencies stay as the installer left them).
refresh_agent() {  # refresh_agent ROOT STAGE HASH
    root=$1
    stage=$2
    hash=$3
    stamp="$root/opt/slmfleet/source-hash"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
        return 0
    fi
    wheel=$(cd "$stage/dist" && ls slmfleet-*.whl)
    mkdir -p "$root/tmp/slmfleet-refresh"
    cp "$stage/dist/$wheel" "$root/tmp/slmfleet-refresh/"
    say "installing this checkout's agent ($hash) into the root"
    (run_in_root "$root" /opt/slmfleet/venv/bin/python -m pip install --quiet --no-deps --force-reinstall \
        "/tmp/slmfleet-refresh/$wheel") >&2 || die "cannot install the checkout's wheel into $root"
    rm -rf "$root/tmp/slmfleet-refresh"
    echo "$hash" > "$stamp"
}

build() {
    need_root
    ensure_binfmt
    mkdir -p "$CACHE"
    if [ "${SLMFLEET_ARM64_LOCK_HELD:-0}" != 1 ]; then
        exec 9>"$CACHE/lock"
        flock 9
    fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    stage_source "$work/src"
    hash=$(source_hash "$work/src")
    key=$(root_key)
    root="$CACHE/root-$key"
    if [ ! -x "$root/opt/slmfleet/venv/bin/slmfleet" ]; then
        for old in "$CACHE"/root-*; do
            [ -e "$old" ] || continue
            if grep -q " $old/" /proc/mounts; then die "$old has mounts; not removing it"; fi
            say "removing the outdated root $old"
            rm -rf "$old"
        done
        build_wheel "$work/src" "$work/stage/dist"
        start=$(date +%s)
        build_root "$root.tmp" "$work/stage"
        echo "$hash" > "$root.tmp/opt/slmfleet/source-hash"
        mv "$root.tmp" "$root"
        say "built $root in $(($(date +%s) - start)) s, $(du -sm "$root" | cut -f1) MiB"
    elif [ "$(cat "$root/opt/slmfleet/source-hash" 2>/dev/null)" != "$hash" ]; then
        build_wheel "$work/src" "$work/stage/dist"
        refresh_agent "$root" "$work/stage" "$hash"
    fi
    echo "$root"
}

case "${1:-}" in
    build) shift; [ $# -eq 0 ] || die "build takes no arguments"; build ;;
    binfmt) need_root; ensure_binfmt ;;
    run) shift; [ $# -ge 2 ] || die "usage: $0 run ROOT CMD..."; need_root; ensure_binfmt; run_in_root "$@" ;;
    -h|--help) usage ;;
    *) usage >&2; exit 2 ;;
esac
