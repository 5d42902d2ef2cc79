"""Builds adaptive_lr and its C++ extension adaptive_lr._C (the fused CPU kernels, and the CUDA
kernels when torch has CUDA and a CUDA toolkit is found).

Build against the installed torch: `pip install --no-build-isolation -e .` (an isolated build would
fetch another torch). Without torch at build time (a plain `pip install .`) the package installs
pure-Python and compiles its CPU kernels on first use instead (adaptive_lr/backends/extension.py);
csrc/ ships in the package as adaptive_lr/csrc for that. For the CUDA kernels set CUDA_HOME to the
toolkit root (the directory whose bin/ holds the real nvcc) and, optionally, TORCH_CUDA_ARCH_LIST
(default: sm_80 and sm_90 code, plus PTX that newer GPUs compile at load time); see docs/cuda.md.
"""

import concurrent.futures
import glob
import importlib.util
import os
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_cpu_build():
    """adaptive_lr/backends/cpu_build.py, the compile settings the just-in-time build shares
    (loaded by path: importing the package would import torch)."""
    path = os.path.join(ROOT, "adaptive_lr", "backends", "cpu_build.py")
    spec = importlib.util.spec_from_file_location("adaptive_lr_cpu_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_build = _load_cpu_build()
KERNEL_SOURCES = [f"csrc/{source}" for source in cpu_build.KERNEL_SOURCES]

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
    except ImportError as error:
        # pip hides a successful build's output (shown with -v); python -m build shows it
        rule = "!" * 100
        print(f"{rule}\nWARNING: torch is not importable at build time ({error}), so "
              "adaptive_lr._C is NOT built: this is a pure-Python\nbuild. The fused CPU kernels "
              "will be compiled on first use instead (needs a C++ compiler and ninja; once per\n"
              "torch version), unless ADAPTIVE_LR_JIT=0. To build them now, install torch first "
              "and then adaptive_lr with\n`pip install --no-build-isolation`.\n"
              f"{rule}", file=sys.stderr)
        return [], {}

    class BuildExtensionPerCapability(BuildExtension):
        """Compiles KERNEL_SOURCES once per CPU capability and links every variant into _C."""

        def build_extension(self, ext):
            def compile_for(capability):
                return self.compiler.compile(
                    KERNEL_SOURCES,
                    output_dir=os.path.join(self.build_temp, capability.lower()),
                    macros=cpu_build.capability_macros(capability),
                    include_dirs=ext.include_dirs,
                    extra_postargs=cpu_build.KERNEL_FLAGS + cpu_build.CPU_CAPABILITIES[capability],
                    depends=ext.depends,
                )

            # every capability at once (each call is one ninja run of two files, in a directory of
            # its own): one after another, the cores idled while each ninja waited for its longer
            # file (setup.py build_ext here: 86-95 s, at once 69-71 s)
            with concurrent.futures.ThreadPoolExecutor(len(cpu_build.CPU_CAPABILITIES)) as pool:
                ext.extra_objects = [obj for objects in pool.map(compile_for,
                                                                 cpu_build.CPU_CAPABILITIES)
                                     for obj in objects]
            super().build_extension(ext)

    with_cuda = _cuda_toolkit() is not None
    nvcc_archs = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else DEFAULT_CUDA_ARCHS
    extension = (CUDAExtension if with_cuda else CppExtension)(
        "adaptive_lr._C",
        sources=[f"csrc/{source}" for source in cpu_build.SOURCES]
        + (CUDA_SOURCES if with_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc", d) for d in cpu_build.INCLUDE_DIRS],
        define_macros=([("ADAPTIVE_LR_CPU_X86", None)] if cpu_build.X86 else [])
        + ([("ADAPTIVE_LR_WITH_CUDA", None)] if with_cuda else []),
        extra_compile_args={"cxx": cpu_build.CXX_FLAGS, "nvcc": NVCC_FLAGS + nvcc_archs},
        extra_link_args=cpu_build.LINK_FLAGS,
        # a change to the kernel or a header relinks _C (the kernel objects are built above)
        depends=KERNEL_SOURCES
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
    # kernels/ ships as adaptive_lr.kernels: a top-level `kernels` belongs to another PyPI project;
    # csrc/ as adaptive_lr/csrc, the sources of the just-in-time build
    packages=find_packages(include=["adaptive_lr", "adaptive_lr.*"])
    + ["adaptive_lr.kernels", "adaptive_lr.csrc"],
    package_dir={"adaptive_lr.kernels": "kernels", "adaptive_lr.csrc": "csrc"},
    package_data={"adaptive_lr.csrc": ["**/*.h", "**/*.cuh", "**/*.cpp", "**/*.cu"]},
    install_requires=["torch>=2.5"],
    # `adaptive-lr demo|bench|sweep`: data, baselines, progress bars and plots
    extras_require={"study": ["numpy", "scikit-learn", "adabelief-pytorch", "lion-pytorch", "tqdm",
                              "matplotlib", "prodigyopt", "schedulefree", "dog-optimizer",
                              "dadaptation"]},
    entry_points={"console_scripts": ["adaptive-lr=adaptive_lr.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
