#!/usr/bin/env bash
# Differential tests against real MindSpore 2.10: builds MindSpore's own virtual environment if
# it is missing (CPU wheel, ~2.8 GB; MindSpore pins its own numpy, so torch stays out of it),
# then runs tests/mindspore_diff with every skip turned into a failure.
#
#   PYTHON               interpreter with asyncckpt's test dependencies (default: .venv/bin/python)
#   MINDSPORE_PYTHON     interpreter MindSpore's venv is built from (default: python3.11)
#   ASYNCCKPT_MINDSPORE_VENV  where that venv lives (default: ~/.cache/asyncckpt/venv-mindspore-2.10)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${ASYNCCKPT_MINDSPORE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/asyncckpt/venv-mindspore-2.10}"
if [ ! -x "$venv/bin/python" ]; then
    echo "building MindSpore's virtual environment in $venv"
    "${MINDSPORE_PYTHON:-python3.11}" -m venv "$venv"
    "$venv/bin/pip" install -q mindspore==2.10.0 || { rm -rf "$venv"; exit 1; }
fi
export ASYNCCKPT_MINDSPORE_VENV="$venv" ASYNCCKPT_REQUIRE_MINDSPORE=1
exec "${PYTHON:-.venv/bin/python}" -m pytest -q -p no:cacheprovider tests/mindspore_diff "$@"
