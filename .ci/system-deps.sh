#!/usr/bin/env bash
# Debian tools the tests use as real peers: dcm2niix (DICOM series -> NIfTI), Orthanc with its DICOMweb plugin
# and dcmtk's storescu (a PACS the server pulls from), Chromium (the viewer, driven by Playwright), dicom3tools'
# dciodvfy (validates the DICOM SRs medvlp writes).
# Installs what is missing when it can (root or sudo with apt-get); otherwise says what the tests will skip.
# The tests start their own Orthanc from their own config on free loopback ports: no system service is needed,
# and none is started here (policy-rc.d refuses service starts while installing, in case the image has an init).
set -euo pipefail
need=()
command -v dcm2niix >/dev/null 2>&1 || need+=(dcm2niix)
{ command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-liberation)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    export DEBIAN_FRONTEND=noninteractive
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
      $SUDO chmod +x "$policy"
      trap '$SUDO rm -f "$policy"' EXIT
    fi
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    exit 0
  fi
fi
echo "note: could not install ${need[*]}; tests that use them skip outside CI (and fail under CI=true)" >&2
