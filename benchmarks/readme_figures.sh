#!/usr/bin/env bash
# The run behind the README's benchmark table: 1 GiB state (MLP + Adam), 8 interleaved saves per
# contender (2 warm-up), plus the training loop (256 MiB model, a save every 10 steps).
# About 15 minutes on a quiet 2-core VM; results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m asyncckpt bench \
    --size 1GiB --layout model --saves 8 --warmup 2 \
    --train-size 256MiB --train-rounds 4 --save-every 10 \
    --out benchmarks/results "$@"
