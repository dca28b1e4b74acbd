#!/usr/bin/env bash
# Installs what pyprune needs on a fresh machine and builds the extension in place.
# torch is pinned to the CPU build on this project's machines (an unpinned torch pulls a multi-GB CUDA build);
# build isolation is off so the extension compiles against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" numpy ninja "setuptools>=64" wheel
python -m pip install -q "pytest" "pytest-benchmark" "hypothesis" "expecttest" "rich" "matplotlib" "scikit-learn" "triton"
python -m pip install -q --no-build-isolation -e ".[test]"
