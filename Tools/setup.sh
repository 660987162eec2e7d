#!/usr/bin/env bash
# Installs the system packages Spindle builds and tests with, when any is missing (Debian/Ubuntu).
# Usage: Tools/setup.sh [extra-package ...]
set -euo pipefail

packages=(liburing-dev libisal-dev libgnutls28-dev pkg-config util-linux "$@")
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "spindle setup: installing ${missing[*]}" >&2
sudo_command=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "spindle setup: run as root or install sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo_command=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_command[@]}" apt-get update -qq
"${sudo_command[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
