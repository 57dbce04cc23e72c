#!/usr/bin/env bash
# Set up everything napari-hifusion needs, idempotently: Debian libraries for a headless napari
# (when run as root on Debian/Ubuntu), a virtual environment in .venv, the CPU build of torch,
# and the project with its Qt, test and SpatialData extras. Safe to run again; it only adds what
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(xvfb xauth libgl1 libegl1 libglib2.0-0 libxkbcommon-x11-0 libxcb-icccm4
  libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
  libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1
  g++ python3-dev)  # the C++ compiler and headers TorchInductor builds its CPU kernels with

missing_debian_packages() {
  command -v dpkg-query >/dev/null || return 0
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

missing=$(missing_debian_packages)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: $(echo $missing)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: napari needs these system packages for headless use; install them with:"
    echo "  sudo apt-get install -y $(echo $missing)"
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==${TORCH_VERSION:-2.13.0}"
# spatialdata: the SpatialData import/export and its tests (~35 s more the first time);
# openslide: scanner formats (.mrxs, vendor .svs/.ndpi) and their test; scverse: scanpy and
# squidpy, which the interoperability tests plot with (~25 s more).
$PIP install -q -e ".[qt,test,spatialdata,openslide,scverse]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import hifusion_model, napari_hifusion, torch; print('setup: ok, torch', torch.__version__)"
