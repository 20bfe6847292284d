#!/usr/bin/env bash
# Download the wheels the GPU suite carries to a machine without a package index: Liger-Kernel, the CE peer
# of benchmarks/cross_entropy.py. They go to .whl/ (git-ignored); benchmarks/gpu_suite.sh installs them with
# --no-deps (torch and triton are already there). The pin matches benchmarks/cross_entropy.py's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER_VERSION="0.8.5"
mkdir -p .whl
python -m pip download --no-deps --only-binary=:all: "liger-kernel==${LIGER_VERSION}" -d .whl
ls -l .whl
