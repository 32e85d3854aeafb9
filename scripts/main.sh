#!/usr/bin/env bash
# The main job on the default data: train a ResNet-20 on Fashion-MNIST for a few minutes,
# evaluate it, and profile it (params, MACs/FLOPs, memory, measured latency).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/main}"
.venv/bin/leanconv train --model resnet20 --data fashion-mnist --epochs 3 --out "$OUT"
.venv/bin/leanconv eval "$OUT/model.safetensors"
.venv/bin/leanconv profile "$OUT/model.safetensors"
