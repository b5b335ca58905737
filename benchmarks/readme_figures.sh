#!/usr/bin/env bash
# The run behind the README's benchmark table: 1 GiB state (MLP + Adam), 8 interleaved saves per
# contender (2 warm-up), plus the training loop (256 MiB model, a save every 10 steps).
# About 5-11 minutes on a 2-core VM (10.8 min measured on a busy shared one, whose training
# steps ran ~5x slower than when it was quiet); results land in
# benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m asyncckpt bench \
    --size 1GiB --layout model --saves 8 --warmup 2 \
    --train-size 256MiB --train-rounds 6 --save-every 10 \
    --out benchmarks/results "$@"
