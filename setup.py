"""Builds pyprune._C: C++ CPU kernels always, CUDA kernels where a CUDA toolkit and a CUDA build of torch exist.

Env toggles: PYPRUNE_CUDA=0 never builds CUDA sources, PYPRUNE_CUDA=1 requires them; MAX_JOBS as in torch.
The GPU is never probed: a CUDA build needs only the toolkit and torch.version.cuda.
"""
import glob
import os
import shutil
import sysconfig

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> tuple[bool, str]:
    flag = os.environ.get("PYPRUNE_CUDA", "")
    have_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    if flag == "0":
        return False, "disabled by PYPRUNE_CUDA=0"
    if not torch.version.cuda:
        if flag == "1":
            raise RuntimeError("PYPRUNE_CUDA=1 but the installed torch is a CPU build")
        return False, f"torch {torch.__version__} is a CPU build"
    if not have_nvcc:
        if flag == "1":
            raise RuntimeError("PYPRUNE_CUDA=1 but no CUDA toolkit (nvcc / CUDA_HOME) was found")
        return False, "no CUDA toolkit (nvcc / CUDA_HOME) found at build time"
    # torch guesses CUDA_HOME from nvcc's path: an nvcc wrapper outside the toolkit (/usr/local/bin/nvcc)
    # gives /usr/local, and the build failed minutes later on a missing cuda_runtime.h
    headers = [os.path.join(CUDA_HOME, "include")] if CUDA_HOME else []
    headers += [os.environ["CUDA_INC_PATH"]] if os.environ.get("CUDA_INC_PATH") else []
    if not any(os.path.exists(os.path.join(d, "cuda_runtime.h")) for d in headers):
        reason = (
            f"no cuda_runtime.h under CUDA_HOME={CUDA_HOME}/include or CUDA_INC_PATH "
            "(set CUDA_HOME to the toolkit)"
        )
        if flag == "1":
            raise RuntimeError(f"PYPRUNE_CUDA=1 but {reason}")
        return False, reason
    return True, f"built with CUDA {torch.version.cuda}"


with_cuda, cuda_reason = _want_cuda()
sources = sorted(glob.glob("csrc/module.cpp") + glob.glob("csrc/cpu/*.cpp"))
cxx = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-std=c++17"]
include_dirs = [os.path.join(ROOT, "csrc", "include")]
define_macros = [("PYPRUNE_WITH_CUDA", "1" if with_cuda else "0")]

if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    if not arch:
        nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    ext = CUDAExtension(
        "pyprune._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "pyprune._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
    )

with open(os.path.join(ROOT, "pyprune", "_build_info.py"), "w") as f:
    f.write(
        "# written by setup.py\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_REASON = {cuda_reason!r}\n"
        f"PLATFORM = {sysconfig.get_platform()!r}\n"
    )

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
