#!/usr/bin/env bash
# System (non-PyPI) packages the tests need, installed with apt-get. Idempotent: quiet and
# exit 0 when everything is already there.
#   espeak-ng: speaks test sentences to WAV for the speech-to-text tests.
set -euo pipefail

# command each package provides -> Debian package name
declare -A PACKAGES=([espeak-ng]=espeak-ng)

missing=()
for cmd in "${!PACKAGES[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PACKAGES[$cmd]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_packages: apt-get not found; install by hand: ${missing[*]}" >&2
  exit 1
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install_system_packages: not root and no sudo; install by hand: ${missing[*]}" >&2
    exit 1
  fi
  sudo=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

echo "install_system_packages: installing ${missing[*]}" >&2
# A fresh machine may have no (or a stale) package list: refresh only when needed.
if ! apt_install 2>/dev/null; then
  "${sudo[@]}" apt-get update -qq >/dev/null
  apt_install
fi
