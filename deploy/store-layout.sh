#!/usr/bin/env bash
# Give a board's store to root and the RPC server its own state directory, as root. install-agent.sh runs
# this on every install, so it also repairs the layout an older install left.
#
#   usage: deploy/store-layout.sh STORE RPC_STATE USER
#
#   STORE      where `edgetune-agent install` (root, through `edgetune flash`) keeps packages and trusted
#              keys, e.g. /var/lib/edgetune: made root's, with everything in it writable by root alone.
#   RPC_STATE  the RPC server's own state (its board id), e.g. /var/lib/edgetune-rpc: USER's.
#   USER       the user the RPC server runs as (edgetune).
#
# Older installs ran the RPC server with the store as its StateDirectory, so USER owned the store and
# code uploaded to the RPC port could replace what root installs and trusts. This makes the store root's
# again, moves the board id to RPC_STATE (the board keeps its identity) and says what to review.
set -euo pipefail

say() { echo "store-layout: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
esac
[ "$#" -eq 3 ] || { usage >&2; exit 2; }
store="$1" rpc_state="$2" user="$3"

[ "$(id -u)" -eq 0 ] || die "run as root: it decides who owns $store"
id -u "$user" >/dev/null 2>&1 || die "no user $user: create it first (install-agent.sh does)"
[ "$(id -u "$user")" -ne 0 ] || die "USER must not be root: the RPC server runs uploaded code"
for dir in "$store" "$rpc_state"; do
    case "$dir" in
        /*) ;;
        *) die "$dir is not an absolute path" ;;
    esac
done
store="${store%/}" rpc_state="${rpc_state%/}"
case "$rpc_state/" in
    "$store"/*) die "RPC_STATE $rpc_state is inside the store $store: the RPC server must not be able to write the store" ;;
esac
case "$store/" in
    "$rpc_state"/*) die "the store $store is inside RPC_STATE $rpc_state: the RPC server could write it" ;;
esac
group="$(id -gn "$user")"

# --- the store: root's alone -------------------------------------------------------------------------------
install -d -m 0755 -o root -g root "$store"
# "$store/" (not "$store"): a store that is a symlink root made (to /data, say) is followed once, and
# nothing inside is (chown -h changes a link itself, chmod -R skips links).
if [ -n "$(find "$store/" -xdev \( ! -user root -o \( ! -type l -perm /022 \) \) -print -quit)" ]; then
    say "$store could be changed by users other than root (an older install gave it to $user): making it root's"
    chown -R -h root:root "$store/"
    chmod -R go-w "$store/"
    if [ -d "$store/trusted" ]; then
        say "while $user could write it, $user could also add keys to $store/trusted and change the installed"
        say "model: check that each key below is one of yours (edgetune keys init printed it), then flash your package again"
        for key in "$store"/trusted/*; do
            [ -f "$key" ] && say "  $key: $(head -c 160 -- "$key" | cat -v)"
        done
    fi
fi

# --- the RPC server's own state -------------------------------------------------------------------------
install -d -m 0700 -o "$user" -g "$group" "$rpc_state"
if [ -f "$store/board-id" ] && [ ! -L "$store/board-id" ]; then
    if [ ! -e "$rpc_state/board-id" ] && [ ! -L "$rpc_state/board-id" ]; then
        # Written as $user: a link planted in its own directory leads nowhere it could not write anyway.
        runuser -u "$user" -- tee "$rpc_state/board-id" < "$store/board-id" >/dev/null \
            || die "could not copy the board id to $rpc_state (see above)"
        say "moved the board id to $rpc_state"
    fi
    rm -f -- "$store/board-id"
fi
