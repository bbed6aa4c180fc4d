#!/usr/bin/env bash
# Debian packages used by the real-SLURM (one- and two-node: iproute2 for the network namespaces) and
# real-browser tests. Idempotent; needs root + apt-get.
set -euo pipefail
PKGS=(slurm-wlm munge iproute2 chromium)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "[install_system] need root and apt-get to install: ${missing[*]}" >&2; exit 1
fi
echo "[install_system] apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
