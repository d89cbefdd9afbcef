#!/usr/bin/env bash
# Make an Android phone a tunable board, from Termux (https://termux.dev; `pkg install python`).
#
#   usage: bash start-agent.sh --tracker HOST:PORT [--key K] [--port P] [--custom-addr IP]
#
#   --tracker      the workstation's tracker (`edgetune tracker`), e.g. 192.168.1.10:9190.
#                  Default: $EDGETUNE_TRACKER. Required: Android apps get no multicast without a
#                  multicast lock, so the tracker is not looked up on mDNS here.
#   --key          device key of the phone (default: $EDGETUNE_KEY, else android).
#   --port         first RPC port to try (default 9090; up to 9199).
#   --custom-addr  the address the tracker hands out for this phone, when it has several.
#
# edgetune-agent itself does not run on Android: the apache-tvm wheels on PyPI are built against
# glibc, and Android's libc is bionic, so `pip install apache-tvm` finds no wheel in Termux. What runs
# on a phone is a TVM runtime built for Android, serving plain TVM RPC:
#   1. when Termux's python can import tvm (a TVM built from source inside Termux), this script runs
#      TVM's own RPC server: python -m tvm.exec.rpc_server --tracker HOST:PORT --key K;
#   2. else, when a tvm_rpc binary built with the Android NDK is found ($TVM_RPC_BIN, on PATH, or next
#      to this script), it runs that: tvm_rpc server --tracker=HOST:PORT --key=K;
#   3. else it prints how to get either, or TVM's Android RPC app (apps/android_rpc in TVM's
#      repository), set up for this tracker and key, and exits 1.
# The workstation then sees the phone as a plain TVM RPC board, which cannot prove the team key: start
# the tracker with `edgetune tracker --allow-plain-key K` for this key. With the phone also on adb,
# `edgetune android connect SERIAL --key K` records its profile, so tasks, tune, build and bench pick its
# target by themselves (else pass --target JSON). Set ANDROID_NDK_HOME (or TVM_NDK_CC) to link for Android.
set -euo pipefail

say() { echo "start-agent: $*" >&2; }
die() { say "error: $*"; exit 1; }

tracker="${EDGETUNE_TRACKER:-}"
key="${EDGETUNE_KEY:-android}"
port=9090
port_end=9199
custom_addr=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --tracker) [ "$#" -ge 2 ] || die "--tracker needs HOST:PORT"; tracker="$2"; shift 2 ;;
        --tracker=*) tracker="${1#*=}"; shift ;;
        --key) [ "$#" -ge 2 ] || die "--key needs a value"; key="$2"; shift 2 ;;
        --key=*) key="${1#*=}"; shift ;;
        --port) [ "$#" -ge 2 ] || die "--port needs a number"; port="$2"; shift 2 ;;
        --port=*) port="${1#*=}"; shift ;;
        --custom-addr) [ "$#" -ge 2 ] || die "--custom-addr needs an IP"; custom_addr="$2"; shift 2 ;;
        --custom-addr=*) custom_addr="${1#*=}"; shift ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ -n "$tracker" ] || die "no tracker: pass --tracker HOST:PORT (the workstation running \`edgetune tracker\`, port 9190 by default)"
[[ "$tracker" =~ ^[^[:space:]:]+:[0-9]+$ ]] || die "--tracker '$tracker' is not HOST:PORT (e.g. 192.168.1.10:9190)"
case "$key" in
    ""|*:*|*[[:space:]]*) die "--key '$key' is empty or contains ':' or white space, which TVM's tracker cannot match" ;;
esac
if ! [[ "$port" =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt "$port_end" ]; then
    die "--port $port is not a port number in 1-$port_end"
fi
tracker_host="${tracker%:*}"
tracker_port="${tracker##*:}"

# Android suspends the CPU of an idle phone; Termux's wake lock keeps it running while the server does.
if command -v termux-wake-lock >/dev/null; then
    termux-wake-lock || true
fi

# --- 1. TVM's Python RPC server ---------------------------------------------------------------------
python_bin=""
for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import tvm.rpc' >/dev/null 2>&1; then
        python_bin="$candidate"
        break
    fi
done
if [ -n "$python_bin" ]; then
    say "starting TVM's RPC server ($python_bin, TVM $("$python_bin" -c 'import tvm; print(tvm.__version__)')) for key $key, tracker $tracker"
    args=(-m tvm.exec.rpc_server --host 0.0.0.0 --port "$port" --port-end "$port_end" --tracker "$tracker" --key "$key")
    [ -z "$custom_addr" ] || args+=(--custom-addr "$custom_addr")
    exec "$python_bin" "${args[@]}"
fi

# --- 2. TVM's C++ RPC server built with the NDK -----------------------------------------------------
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
rpc_bin="${TVM_RPC_BIN:-}"
if [ -z "$rpc_bin" ]; then
    if command -v tvm_rpc >/dev/null; then
        rpc_bin="$(command -v tvm_rpc)"
    elif [ -x "$script_dir/tvm_rpc" ]; then
        rpc_bin="$script_dir/tvm_rpc"
    fi
fi
if [ -n "$rpc_bin" ]; then
    [ -x "$rpc_bin" ] || die "TVM_RPC_BIN=$rpc_bin is not an executable file"
    # libtvm_runtime.so, libtvm_ffi.so and libc++_shared.so are pushed next to the binary.
    rpc_dir="$(dirname "$rpc_bin")"
    export LD_LIBRARY_PATH="$rpc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "starting $rpc_bin for key $key, tracker $tracker"
    args=(server --host=0.0.0.0 --port="$port" --port-end="$port_end" --tracker="$tracker" --key="$key")
    [ -z "$custom_addr" ] || args+=(--custom-addr="$custom_addr")
    exec "$rpc_bin" "${args[@]}"
fi

# --- 3. nothing to run here: what to do instead -------------------------------------------------------
cat >&2 <<EOF
No TVM runtime for Android here: Termux's python cannot import tvm and no tvm_rpc binary was found.
(The apache-tvm wheels on PyPI are built for glibc Linux; Android's libc is bionic, so pip finds none.)
Use one of these, built from the same TVM release as the workstation (0.27):

 A. TVM's Android RPC app (apps/android_rpc in TVM's repository; build it with Gradle and the NDK as
    its README says, then: adb install tvmrpc-release.apk). Open it and set
        Address: $tracker_host
        Port:    $tracker_port
        Key:     $key
    then press START RPC, and keep the app in the foreground while tuning.

 B. TVM's C++ RPC server (apps/cpp_rpc), cross-compiled on the workstation with the NDK:
        cmake -S tvm -B build-android -DUSE_CPP_RPC=ON -DCMAKE_BUILD_TYPE=Release \\
              -DCMAKE_TOOLCHAIN_FILE=\$ANDROID_NDK_HOME/build/cmake/android.toolchain.cmake \\
              -DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-28
        cmake --build build-android --target tvm_runtime tvm_rpc
    push tvm_rpc, libtvm_runtime.so, libtvm_ffi.so and the NDK's libc++_shared.so to the phone, then
        adb shell "cd /data/local/tmp && LD_LIBRARY_PATH=. ./tvm_rpc server --tracker=$tracker --key=$key"
    (or copy them into Termux's home next to this script and run it again: it starts ./tvm_rpc).

Then, on the workstation:
    edgetune devices        # the phone is listed as "plain TVM RPC (no agent)", key $key
    export ANDROID_NDK_HOME=/path/to/android-ndk     # or TVM_NDK_CC=.../aarch64-linux-android28-clang++
    edgetune tune model.onnx --device $key --trials 256 --log runs/$key \\
        --target '{"kind":"llvm","mtriple":"aarch64-linux-android","mattr":["+neon"],"num-cores":4}'
    (num-cores: the phone's big cores; name its CPU with "mcpu" when known, e.g. "cortex-a76")
EOF
die "no TVM RPC server started (see above)"
