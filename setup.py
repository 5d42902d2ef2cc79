"""Builds adaptive_lr and its C++ extension adaptive_lr._C (the fused CPU kernels, and the CUDA
kernels when torch has CUDA and a CUDA toolkit is found).

Build against the installed torch: `pip install --no-build-isolation -e .` (an isolated build would
fetch another torch). Without torch at build time the package installs pure-Python, and the "cpu"
backend reports that adaptive_lr._C is not built. For the CUDA kernels set CUDA_HOME to the toolkit
root (the directory whose bin/ holds the real nvcc) and, optionally, TORCH_CUDA_ARCH_LIST (default:
sm_80 and sm_90 code, plus PTX that newer GPUs compile at load time); see docs/cuda.md.
"""

import glob
import os
import platform
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
KERNEL_SOURCE = "csrc/cpu/fused_step_kernel.cpp"
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

# at::vec::Vectorized is real SIMD only in a translation unit compiled for one capability, so the
# kernel source is compiled once per capability (ISA flags as torch's own kernels use them) and the
# launcher picks one at run time. Never -march=native: the wheel must run on other machines.
CPU_CAPABILITIES = {"DEFAULT": []}
if X86:
    CPU_CAPABILITIES["AVX2"] = ["-mavx2", "-mfma", "-mf16c"]
    CPU_CAPABILITIES["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]

# -fopenmp: at::parallel_for is serial without it. -fno-math-errno: sqrt becomes an instruction.
# -ffp-contract=off: no FMA contraction, so the SIMD body, the scalar tail and every capability
# round identically (results do not depend on thread count, tensor size or machine).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
# The kernels are explicit SIMD (at::vec); GCC 12's SLP vectorizer has miscompiled their scalar
# set-up (AVX-512: a gradient divisor reached lane 0 only; tests/test_fused_op.py), so it is off.
KERNEL_FLAGS = CXX_FLAGS + ["-fno-tree-slp-vectorize"]

# the kernels of every optimizer: csrc/cuda/*.cu, never a hand list
CUDA_SOURCES = ["csrc/cuda/ops_cuda.cpp"] + sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
# --fmad=false: no FMA contraction, the rounding of the CPU kernels (csrc/cuda/active_step.cuh)
NVCC_FLAGS = ["-O3", "--fmad=false"]
DEFAULT_CUDA_ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                      "-gencode=arch=compute_90,code=compute_90"]


def _cuda_toolkit():
    """The CUDA toolkit root to build the CUDA kernels with; None (saying why) when there is none
    or torch has no CUDA to link them against."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return None
    # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit
    runtime_header = os.path.join(CUDA_HOME or "", "include", "cuda_runtime.h")
    if CUDA_HOME is None or not os.path.isfile(runtime_header):
        warnings.warn(
            f"torch has CUDA {torch.version.cuda} but CUDA_HOME={CUDA_HOME} is no CUDA toolkit: "
            "adaptive_lr._C is built without its CUDA kernels (set CUDA_HOME to the toolkit root)"
        )
        return None
    return CUDA_HOME


def _extensions_and_commands():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: adaptive_lr._C is not built")
        return [], {}

    class BuildExtensionPerCapability(BuildExtension):
        """Compiles KERNEL_SOURCE once per CPU capability and links every variant into _C."""

        def build_extension(self, ext):
            objects = []
            for capability, isa_flags in CPU_CAPABILITIES.items():
                objects += self.compiler.compile(
                    [KERNEL_SOURCE, "csrc/cpu/active_wrapper.cpp"],
                    output_dir=os.path.join(self.build_temp, capability.lower()),
                    macros=[("CPU_CAPABILITY", capability), (f"CPU_CAPABILITY_{capability}", None)],
                    include_dirs=ext.include_dirs,
                    extra_postargs=KERNEL_FLAGS + isa_flags,
                    depends=ext.depends,
                )
            ext.extra_objects = objects
            super().build_extension(ext)

    with_cuda = _cuda_toolkit() is not None
    nvcc_archs = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else DEFAULT_CUDA_ARCHS
    extension = (CUDAExtension if with_cuda else CppExtension)(
        "adaptive_lr._C",
        sources=["csrc/ops.cpp", "csrc/cpu/fused_step.cpp"] + (CUDA_SOURCES if with_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],
        define_macros=([("ADAPTIVE_LR_CPU_X86", None)] if X86 else [])
        + ([("ADAPTIVE_LR_WITH_CUDA", None)] if with_cuda else []),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + nvcc_archs},
        extra_link_args=["-fopenmp"],
        # a change to the kernel or a header relinks _C (the kernel objects are built above)
        depends=[KERNEL_SOURCE, "csrc/cpu/active_wrapper.cpp"]
        + glob.glob("csrc/**/*.h", root_dir=ROOT, recursive=True)
        + glob.glob("csrc/**/*.cuh", root_dir=ROOT, recursive=True),
    )
    return [extension], {"build_ext": BuildExtensionPerCapability}


ext_modules, cmdclass = _extensions_and_commands()

setup(
    name="adaptive_lr",
    version="0.1.0",
    description="ActiveLR optimizers and the GreedyLR scheduler for PyTorch, with fused kernels",
    python_requires=">=3.10",
    # kernels/ ships as adaptive_lr.kernels: a top-level `kernels` belongs to another PyPI project
    packages=find_packages(include=["adaptive_lr", "adaptive_lr.*"]) + ["adaptive_lr.kernels"],
    package_dir={"adaptive_lr.kernels": "kernels"},
    install_requires=["torch>=2.5"],
    # `adaptive-lr demo|bench|sweep`: data, baselines, progress bars and plots
    extras_require={"study": ["numpy", "scikit-learn", "adabelief-pytorch", "lion-pytorch", "tqdm",
                              "matplotlib"]},
    entry_points={"console_scripts": ["adaptive-lr=adaptive_lr.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
