#!/usr/bin/env bash
# Compile check (syntax and types, no object code) of the CUDA build's torch glue, csrc/cuda/*_torch.cpp, on a
# machine whose torch is a CPU build: nvcc supplies the CUDA runtime headers. The CPU wheel lacks one header
# that torch generates at its own build, c10/cuda/impl/cuda_cmake_macros.h (it only sets the export macro of
# c10_cuda), so a stand-in goes to a temporary include directory when torch has none. The kernels themselves
# (csrc/cuda/*.cu) are checked by `nvcc -c` in .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "check_cuda_glue: no nvcc, skipped"; exit 0; }
TORCH_INC=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PY_INC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
STUB=$(mktemp -d)
trap 'rm -rf "$STUB"' EXIT
if [ ! -e "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$STUB/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
fi
for f in csrc/cuda/*_torch.cpp; do
  [ -e "$f" ] || continue
  echo "nvcc -fsyntax-only $f"
  # flags as setup.py's C++ flags; torch's headers warn at C++17 about C++20 bit-field initializers
  nvcc -std=c++17 -Xcompiler -fsyntax-only -Xcompiler -Wno-c++20-extensions -c "$f" -o "$STUB/glue.o" \
    -I "$STUB" -I "$TORCH_INC" -I "$TORCH_INC/torch/csrc/api/include" -I "$PY_INC" -I csrc/include -I csrc/cuda \
    -DTORCH_EXTENSION_NAME=_C
done
