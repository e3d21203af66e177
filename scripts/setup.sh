#!/usr/bin/env bash
# Create .venv and install cr_accel into it (idempotent). `--test` adds what the test suite needs.
#
# torch: on a machine without an NVIDIA GPU this pins torch==2.13.0, the CPU build (an unpinned
# `torch` from PyPI is a multi-GB CUDA build). With a GPU, install the torch build for your CUDA
# first (https://pytorch.org/get-started/locally/) into .venv, or let this script take PyPI's default.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! $py -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        $py -m pip install -q torch
    else
        $py -m pip install -q "torch==2.13.0"
    fi
fi
$py -m pip install -q -e ".${extras}"
# The dashboard's browser test drives Debian's chromium through playwright (never `playwright install`).
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
echo "cr_accel installed in .venv ($($py -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate", accelerate.__version__)'))"
