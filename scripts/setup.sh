#!/usr/bin/env bash
# Set up everything s2hpruner needs on a fresh Debian-like machine:
#   - the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist), where apt is available
#   - a virtual environment .venv with torch, torchvision and the package itself (+ dev extras)
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
FMNIST_DIR=/usr/share/datasets/fashion-mnist

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] && [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[setup] installing Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "[setup] apt-get is not available: download the four Fashion-MNIST IDX files" >&2
    echo "        yourself and pass their folder with --data-root" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
# torch/torchvision pinned for this kind of machine (pip takes them from local disk);
# pyproject.toml declares the ranges users can live with.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] installing s2hpruner[dev]"
.venv/bin/pip install -q -e ".[dev]"
echo "[setup] done"
