#!/bin/sh
# Host packages and emulation for the emulated Raspberry Pi 4 board (tests/e2e/board.py).
#
# Idempotent and quick when everything is in place, so the test fixtures run it on every session:
#   1. Debian packages: qemu-user-static binfmt-support g++-aarch64-linux-gnu debootstrap
#      (plus iproute2, util-linux, openssh-client for the namespace, mounts and SSH).
#   2. binfmt_misc mounted.
#   3. qemu 10 from Debian trixie, unpacked into the board cache (bookworm's qemu 7.2 lacks
#      IP_MULTICAST_IF, so python-zeroconf fails inside the board with OSError 92, and its
#      /proc/cpuinfo shows the host CPU). apt runs with a private sources list and private
#      state/cache dirs: the system's apt configuration is left untouched.
#   4. That qemu registered with binfmt_misc as "edgetune-aarch64" (flags F: the kernel opens the
#      interpreter now, so it runs inside any chroot; P: argv[0] preserved), and bookworm's
#      "qemu-aarch64" entry disabled so ours is the one that runs aarch64 binaries.
#
# Environment: EDGETUNE_BOARD_CACHE (default /var/cache/edgetune/board),
#              EDGETUNE_DEBIAN_MIRROR (default: the first Debian mirror in /etc/apt/sources.list(.d)).
set -eu

CACHE="${EDGETUNE_BOARD_CACHE:-/var/cache/edgetune/board}"
QEMU_DIR="$CACHE/qemu10"
QEMU_BIN="$QEMU_DIR/root/usr/bin/qemu-aarch64"
BINFMT_DIR=/proc/sys/fs/binfmt_misc
BINFMT_NAME=edgetune-aarch64
# ELF64, little endian, e_machine EM_AARCH64 (0xb7): the same magic/mask as Debian's qemu-aarch64.
BINFMT_MAGIC='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
BINFMT_MASK='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'

say() { echo "install-board-deps: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt, binfmt_misc, mounts and network namespaces need it)"

# --- 1. Debian packages -------------------------------------------------------------------------
missing=""
for pkg in qemu-user-static binfmt-support g++-aarch64-linux-gnu debootstrap iproute2 util-linux \
           openssh-client ca-certificates; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    say "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    if ! apt-get install -y --no-install-recommends $missing >/dev/null 2>&1; then
        apt-get update >/dev/null || die "apt-get update failed: check the network and /etc/apt/sources.list"
        # shellcheck disable=SC2086
        apt-get install -y --no-install-recommends $missing >/dev/null \
            || die "apt-get install$missing failed: see the apt output above"
    fi
fi

# --- 2. binfmt_misc --------------------------------------------------------------------------------
if [ ! -e "$BINFMT_DIR/register" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT_DIR" \
        || die "cannot mount binfmt_misc on $BINFMT_DIR: the kernel needs CONFIG_BINFMT_MISC"
fi

# --- 3. qemu 10 from trixie ------------------------------------------------------------------------
find_mirror() {
    if [ -n "${EDGETUNE_DEBIAN_MIRROR:-}" ]; then echo "$EDGETUNE_DEBIAN_MIRROR"; return; fi
    # One-line entries ("deb [opts] URI suite ...") and deb822 entries ("URIs: URI").
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        sed -n -e 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' \
               -e 's/^[[:space:]]*URIs:[[:space:]]*\([^[:space:]]\+\).*/\1/p' "$f"
    done | grep -E '^https?://[^ ]+/debian/?$' | head -n 1 | sed 's:/*$::'
}

qemu_ok() {
    [ -x "$QEMU_BIN" ] && [ -e "$QEMU_DIR/.complete" ] \
        && "$QEMU_BIN" --version 2>/dev/null | head -n 1 | grep -Eq 'version (1[0-9]|[2-9][0-9])\.'
}

if ! qemu_ok; then
    mirror="$(find_mirror)"
    [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list(.d): set EDGETUNE_DEBIAN_MIRROR=URL"
    say "fetching qemu 10 (trixie qemu-user) from $mirror"
    apt_dir="$CACHE/apt-trixie"
    partial="$QEMU_DIR.partial"
    rm -rf "$partial"
    mkdir -p "$apt_dir/etc/sources.list.d" "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" \
             "$partial/debs" "$partial/root"
    : > "$apt_dir/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
        > "$apt_dir/etc/sources.list"
    set -- -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list" \
           -o "Dir::Etc::SourceParts=$apt_dir/etc/sources.list.d" \
           -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/status" \
           -o "Dir::Cache=$apt_dir/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
    apt-get "$@" update >/dev/null \
        || die "apt-get update for trixie failed: check that $mirror serves trixie (or set EDGETUNE_DEBIAN_MIRROR)"
    (cd "$partial/debs" && { apt-get "$@" download qemu-user >/dev/null 2>&1 \
                             || apt-get "$@" download qemu-user-static >/dev/null; }) \
        || die "cannot download trixie's qemu-user: check the mirror and the network"
    for deb in "$partial"/debs/*.deb; do dpkg-deb -x "$deb" "$partial/root"; done
    [ -x "$partial/root/usr/bin/qemu-aarch64" ] || [ ! -x "$partial/root/usr/bin/qemu-aarch64-static" ] \
        || ln -s qemu-aarch64-static "$partial/root/usr/bin/qemu-aarch64"
    rm -rf "$partial/debs"
    "$partial/root/usr/bin/qemu-aarch64" --version | head -n 1 > "$partial/.complete" \
        || die "the downloaded qemu-aarch64 does not run"
    rm -rf "$QEMU_DIR"
    mv "$partial" "$QEMU_DIR"
    qemu_ok || die "qemu from trixie is not version 10 or later: $(head -n 1 "$QEMU_DIR/.complete")"
fi

# --- 4. binfmt_misc registration -------------------------------------------------------------------
qemu_real="$(readlink -f "$QEMU_BIN")"
entry="$BINFMT_DIR/$BINFMT_NAME"
# An entry that works is kept even if it points at another cache's qemu 10: replacing it would leave
# a moment without one for boards already running.
entry_ok() {
    interp="$(sed -n 's/^interpreter //p' "$entry")"
    grep -qx enabled "$entry" && grep -q '^flags: .*F' "$entry" && [ -x "$interp" ] \
        && "$interp" --version 2>/dev/null | head -n 1 | grep -Eq 'version (1[0-9]|[2-9][0-9])\.'
}
if [ -e "$entry" ] && ! entry_ok; then
    echo -1 > "$entry"
fi
if [ ! -e "$entry" ]; then
    printf ':%s:M::%s:%s:%s:FP\n' "$BINFMT_NAME" "$BINFMT_MAGIC" "$BINFMT_MASK" "$qemu_real" \
        > "$BINFMT_DIR/register" || die "cannot register $qemu_real with binfmt_misc"
fi
# Entries registered later take precedence; bookworm's own entry (qemu 7.2) must not run the board.
if [ -e "$BINFMT_DIR/qemu-aarch64" ] && grep -qx enabled "$BINFMT_DIR/qemu-aarch64"; then
    echo 0 > "$BINFMT_DIR/qemu-aarch64"
fi
exit 0
