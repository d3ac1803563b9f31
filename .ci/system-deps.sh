#!/usr/bin/env bash
# Debian tools the tests use as real peers: dcm2niix (DICOM series -> NIfTI).
# Installs what is missing when it can (root or sudo with apt-get); otherwise says what the tests will skip.
set -euo pipefail
need=()
command -v dcm2niix >/dev/null 2>&1 || need+=(dcm2niix)
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    exit 0
  fi
fi
echo "note: could not install ${need[*]}; tests that use them skip outside CI (and fail under CI=true)" >&2
