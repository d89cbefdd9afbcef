#!/usr/bin/env bash
# System packages edgetune's workstation side and its test suite need (Debian 12, as root).
# Installs only what is missing, so a warm machine spends no time here.
#   usage: scripts/install-system-deps.sh [demo|test]
set -euo pipefail
mode="${1:-test}"
packages=(g++ make)
if [ "$mode" = test ]; then
  # sshd for the flashing tests, the aarch64 cross compiler, iproute2 for the emulated board's
  # network namespace, systemd-analyze and shellcheck to check the deploy files, adb (client and server)
  # for the Android tests, a PostgreSQL server for the team schedule store's tests.
  packages+=(openssh-server g++-aarch64-linux-gnu iproute2 systemd shellcheck adb postgresql)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${missing[*]}; install them (sudo apt-get install ${missing[*]}) and run again" >&2
  exit 1
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
