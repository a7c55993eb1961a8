#!/usr/bin/env bash
# README command 1: set up, then prune resnet20 on Fashion-MNIST to 35% of its FLOPs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/s2hpruner prune --config configs/fmnist_resnet20.yaml "$@"
