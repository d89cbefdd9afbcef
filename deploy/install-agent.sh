#!/usr/bin/env bash
# Install the edgetune board agent on a Raspberry Pi (or any 64-bit Debian-like board), as root.
#
#   usage: deploy/install-agent.sh [SOURCE] [--key K] [--tracker HOST:PORT] [--name N] [--trust KEY.pub]
#                                  [--team-key FILE]
#
#   SOURCE   what to pip-install: an edgetune checkout, a wheel, or a URL pip understands.
#            Default: the current directory if it is an edgetune checkout, else the checkout this
#            script is in.
#   --key    device key of the board (e.g. rpi4); required on the first install.
#   --tracker, --name   written to /etc/default/edgetune-agent (empty tracker: found by mDNS).
#   --trust  a public key from `edgetune keys init`, trusted for packages (edgetune-agent trust).
#   --team-key  the workstation's ~/.config/edgetune/team.key: only hosts holding it run code here.
#
# What it does, and again on every run (it is idempotent; a re-run upgrades the agent):
#   1. python3 -m venv /opt/edgetune/venv (installs python3-venv when missing);
#   2. pip install SOURCE into it: the base install, which is the board agent (TVM runtime, RPC, mDNS);
#   3. links /usr/local/bin/edgetune-agent, the command `edgetune flash` runs over SSH;
#   4. writes /etc/default/edgetune-agent (keeps what is there, changes only the values given);
#   5. makes the system user edgetune, gives the store (/var/lib/edgetune) to root alone and the
#      service its own state directory /var/lib/edgetune-rpc (store-layout.sh, next to this script:
#      it also takes back a store an older install gave to edgetune);
#   6. installs edgetune-agent.service (next to this script), enabled and (re)started;
#   7. prints `edgetune-agent probe` and what to do next.
set -euo pipefail

PREFIX=/opt/edgetune
VENV="$PREFIX/venv"
AGENT="$VENV/bin/edgetune-agent"
ENV_FILE=/etc/default/edgetune-agent
UNIT_NAME=edgetune-agent.service
UNIT_FILE="/etc/systemd/system/$UNIT_NAME"
LINK=/usr/local/bin/edgetune-agent
LAYOUT_SCRIPT="store-layout.sh"
# The service's own state directory: StateDirectory=edgetune-rpc in the unit.
RPC_STATE=/var/lib/edgetune-rpc
SERVICE_USER=edgetune
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# How long to watch the service after (re)starting it before calling it up (importing TVM takes a few
# seconds on a Pi 4).
START_CHECK_SEC=8

say() { echo "install-agent: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

source_arg="" key="" tracker="" name="" trust="" team_key=""
key_set=0 tracker_set=0 name_set=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --key) [ "$#" -ge 2 ] || die "--key needs a value"; key="$2"; key_set=1; shift 2 ;;
        --key=*) key="${1#*=}"; key_set=1; shift ;;
        --tracker) [ "$#" -ge 2 ] || die "--tracker needs HOST:PORT"; tracker="$2"; tracker_set=1; shift 2 ;;
        --tracker=*) tracker="${1#*=}"; tracker_set=1; shift ;;
        --name) [ "$#" -ge 2 ] || die "--name needs a value"; name="$2"; name_set=1; shift 2 ;;
        --name=*) name="${1#*=}"; name_set=1; shift ;;
        --trust) [ "$#" -ge 2 ] || die "--trust needs a .pub file"; trust="$2"; shift 2 ;;
        --trust=*) trust="${1#*=}"; shift ;;
        --team-key) [ "$#" -ge 2 ] || die "--team-key needs a file"; team_key="$2"; shift 2 ;;
        --team-key=*) team_key="${1#*=}"; shift ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$source_arg" ] || die "more than one SOURCE: $source_arg and $1"; source_arg="$1"; shift ;;
    esac
done

# --- checks that need no change to the system -------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ...): it writes /opt, /etc and the systemd unit"

if [ "$key_set" -eq 1 ]; then
    case "$key" in
        "") die "--key is empty: give the class of board, e.g. --key rpi4" ;;
        *:*|*[[:space:]]*) die "--key '$key' contains ':' or white space, which TVM's tracker cannot match: use letters, digits, '-', '_' or '.'" ;;
    esac
fi
if [ "$tracker_set" -eq 1 ] && [ -n "$tracker" ]; then
    [[ "$tracker" =~ ^[^[:space:]:]+:[0-9]+$ ]] || die "--tracker '$tracker' is not HOST:PORT (e.g. 192.168.1.10:9190)"
fi
if [ -n "$trust" ]; then
    [ -f "$trust" ] || die "--trust $trust: no such file (copy the .pub file \`edgetune keys init\` printed to the board)"
    trust="$(readlink -f -- "$trust")"
fi
if [ -n "$team_key" ]; then
    [ -f "$team_key" ] || die "--team-key $team_key: no such file (copy the workstation's ~/.config/edgetune/team.key to the board)"
    grep -Eqx '[[:space:]]*[0-9a-fA-F]{64}[[:space:]]*' "$team_key" \
        || die "--team-key $team_key is not a team key (one line of 64 hex digits, as \`edgetune tracker\` writes it)"
fi

arch="$(uname -m)"
case "$arch" in
    aarch64|x86_64) ;;
    armv7l|armv6l|armhf)
        die "this is a 32-bit ARM system ($arch): apache-tvm publishes wheels for aarch64 and x86_64 Linux only. Install a 64-bit OS (e.g. Raspberry Pi OS 64-bit), or build TVM's C++ RPC server (apps/cpp_rpc) for it and tune it as a plain TVM RPC board with --target" ;;
    *) die "no apache-tvm wheels for $arch: the agent needs aarch64 or x86_64 Linux" ;;
esac

is_checkout() { [ -f "$1/setup.cfg" ] && grep -Eq '^name[[:space:]]*=[[:space:]]*edgetune[[:space:]]*$' "$1/setup.cfg"; }
if [ -z "$source_arg" ]; then
    if is_checkout "$PWD"; then
        source_arg="$PWD"
    elif is_checkout "$SCRIPT_DIR/.."; then
        source_arg="$(cd "$SCRIPT_DIR/.." && pwd)"
    else
        die "no SOURCE given and neither $PWD nor $SCRIPT_DIR/.. is an edgetune checkout: pass a checkout, a wheel or a URL"
    fi
elif [[ "$source_arg" == *://* ]]; then
    :  # a URL: pip fetches it
elif [ -e "$source_arg" ]; then
    # An absolute path: pip takes a bare word for a package name on an index.
    source_arg="$(readlink -f -- "$source_arg")"
    if [ -d "$source_arg" ]; then
        is_checkout "$source_arg" || die "$source_arg is not an edgetune checkout (no setup.cfg naming edgetune)"
    fi
elif [[ "$source_arg" == */* || "$source_arg" == *.whl || "$source_arg" == *.tar.gz ]]; then
    die "SOURCE $source_arg does not exist: pass an edgetune checkout, a wheel or a URL"
fi

[ -f "$SCRIPT_DIR/$UNIT_NAME" ] || die "$SCRIPT_DIR/$UNIT_NAME not found: run this script from an edgetune checkout's deploy/ folder"
[ -f "$SCRIPT_DIR/$LAYOUT_SCRIPT" ] || die "$SCRIPT_DIR/$LAYOUT_SCRIPT not found: run this script from an edgetune checkout's deploy/ folder"

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    command -v apt-get >/dev/null || die "$* missing and no apt-get here: install $* and run again"
    say "installing $*"
    if ! apt-get install -y --no-install-recommends "$@" >/dev/null; then
        apt-get update >/dev/null || die "apt-get update failed: check the network and /etc/apt/sources.list"
        apt-get install -y --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed (see above)"
    fi
}

# --- 1. Python and the venv ---------------------------------------------------------------------------
command -v python3 >/dev/null || apt_install python3
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2); edgetune needs 3.11 or newer (Debian 12 / Raspberry Pi OS bookworm has it)"
# Debian splits venv's pip bootstrap (ensurepip) into python3-venv.
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "using the venv $VENV"
else
    # Missing, or broken by a Python upgrade: make it again (nothing else lives there).
    rm -rf "$VENV"
    mkdir -p "$PREFIX"
    say "creating the venv $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (see above)"
fi

# --- 2. edgetune ----------------------------------------------------------------------------------------
say "installing edgetune from $source_arg (the TVM wheels are about 100 MB on a first install)"
"$VENV/bin/python" -m pip install --upgrade "$source_arg" \
    || die "pip install $source_arg failed (see above): check the network, or pass a wheel built elsewhere"
"$AGENT" --version >/dev/null || die "$AGENT does not run after the install (see above)"

# --- 3. the command on PATH -------------------------------------------------------------------------
ln -sfn "$AGENT" "$LINK"

# --- 4. /etc/default/edgetune-agent -----------------------------------------------------------------
# set_var NAME VALUE: replace "NAME=..." (or a commented "#NAME=...") in the environment file, else append.
set_var() {
    local var="$1" value="$2" tmp
    tmp="$(mktemp "$ENV_FILE.XXXXXX")"
    awk -v var="$var" -v value="$value" '
        !done && ($0 ~ "^" var "=" || $0 ~ "^#" var "=") { print var "=" value; done = 1; next }
        { print }
        END { if (!done) print var "=" value }
    ' "$ENV_FILE" > "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$ENV_FILE"
}
get_var() { sed -n "s/^$1=//p" "$ENV_FILE" | tail -n 1 | sed -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'$/\1/"; }

if [ ! -f "$ENV_FILE" ]; then
    if [ -f "$SCRIPT_DIR/edgetune-agent.default" ]; then
        install -m 0644 "$SCRIPT_DIR/edgetune-agent.default" "$ENV_FILE"
        # The example's key is a placeholder: only --key sets one.
        set_var EDGETUNE_KEY ""
    else
        printf 'EDGETUNE_KEY=\nEDGETUNE_TRACKER=\nEDGETUNE_NAME=\n' > "$ENV_FILE"
        chmod 0644 "$ENV_FILE"
    fi
    say "wrote $ENV_FILE"
fi
[ "$key_set" -eq 0 ] || set_var EDGETUNE_KEY "$key"
[ "$tracker_set" -eq 0 ] || set_var EDGETUNE_TRACKER "$tracker"
[ "$name_set" -eq 0 ] || set_var EDGETUNE_NAME "$name"
key="$(get_var EDGETUNE_KEY)"
[ -n "$key" ] || die "no device key in $ENV_FILE: run again with --key K (the class of board, e.g. --key rpi4)"
tracker="$(get_var EDGETUNE_TRACKER)"
store="$(get_var EDGETUNE_STORE)"
store="${store:-/var/lib/edgetune}"

# --- 5. the service user, the store (root's) and the service's own state ----------------------------------
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$RPC_STATE" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER" \
        || die "useradd $SERVICE_USER failed (see above): the service runs as this user"
    say "created the system user $SERVICE_USER"
fi
# An older unit made the store its StateDirectory, which systemd gives to the service user on every
# start: stop it before taking the store back (the new unit, installed below, leaves the store alone).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null && systemctl is-active --quiet "$UNIT_NAME"; then
    systemctl stop "$UNIT_NAME" || die "systemctl stop $UNIT_NAME failed: the store cannot be taken back while it runs"
fi
bash "$SCRIPT_DIR/$LAYOUT_SCRIPT" "$store" "$RPC_STATE" "$SERVICE_USER" \
    || die "could not give $store to root (see above)"

# --- trust a signing key --------------------------------------------------------------------------------
if [ -n "$trust" ]; then
    "$AGENT" trust "$trust" --store "$store" || die "edgetune-agent trust $trust failed (see above)"
fi

# --- 6. the systemd unit ----------------------------------------------------------------------------------
# The team key: readable by root and the agent's group only (the agent refuses to start without one).
if [ -n "$team_key" ]; then
    install -d -m 0755 /etc/edgetune
    install -m 0640 -o root -g edgetune "$team_key" /etc/edgetune/team.key
    say "installed the team key as /etc/edgetune/team.key (root:edgetune, mode 640)"
elif [ ! -f /etc/edgetune/team.key ]; then
    say "warning: no /etc/edgetune/team.key: the agent will not start; run again with --team-key FILE (the workstation's ~/.config/edgetune/team.key)"
fi
install -m 0644 "$SCRIPT_DIR/$UNIT_NAME" "$UNIT_FILE"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
    systemctl enable "$UNIT_NAME" >/dev/null 2>&1 || die "systemctl enable $UNIT_NAME failed"
    systemctl restart "$UNIT_NAME" || true
    # A bad setting makes the agent exit within seconds: watch it for a moment before calling it up.
    sleep "$START_CHECK_SEC"
    if systemctl is-active --quiet "$UNIT_NAME"; then
        say "$UNIT_NAME is running (key $key, tracker ${tracker:-found by mDNS}); log: journalctl -u edgetune-agent -f"
    else
        journalctl -u edgetune-agent -n 20 --no-pager >&2 || true
        die "$UNIT_NAME did not stay up (its log is above): fix $ENV_FILE, then systemctl restart edgetune-agent"
    fi
else
    say "systemd is not running here: installed $UNIT_FILE but did not start it; start the agent by hand, as $SERVICE_USER:"
    say "  runuser -u $SERVICE_USER -- env EDGETUNE_RPC_STATE_DIR=$RPC_STATE $AGENT serve --key $key${tracker:+ --tracker $tracker}"
fi

# --- 7. what this board is, and what next --------------------------------------------------------------
echo
"$AGENT" probe || say "edgetune-agent probe failed (see above)"
cat <<EOF

Next steps
  On the workstation:   edgetune tracker            # unless a tracker runs already
                        edgetune devices            # this board should be listed with key $key
  Trust the workstation's signing key, so packages from it install here:
      edgetune keys init                            # on the workstation, once; prints signing_key.pub's path
      scp ~/.config/edgetune/signing_key.pub root@$(hostname):/tmp/
      ssh root@$(hostname) edgetune-agent trust /tmp/signing_key.pub
  (or run this script again with --trust signing_key.pub).
  \`edgetune flash\` logs in over SSH as root by default: put the workstation's SSH public key in
  /root/.ssh/authorized_keys, or flash with --user pi --agent-command 'sudo -n edgetune-agent'.
EOF
