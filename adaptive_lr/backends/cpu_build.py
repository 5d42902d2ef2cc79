"""How the fused CPU kernels of csrc/ are compiled, shared by setup.py (ahead of time: every CPU
capability, linked into adaptive_lr._C) and extension.py (just in time: this machine's capability
only). Standard library only: setup.py reads this file where torch may not be importable."""

import platform

# paths relative to csrc/ (shipped in the package as adaptive_lr/csrc)
SOURCES = ["ops.cpp", "cpu/fused_step.cpp"]
# compiled once per capability by setup.py (the just-in-time build: for this machine's one)
KERNEL_SOURCES = ["cpu/fused_step_kernel.cpp", "cpu/active_wrapper.cpp"]
# defined by the just-in-time build, whose every file is compiled for that one capability
ONE_CAPABILITY_MACRO = "ADAPTIVE_LR_ONE_CAPABILITY"
INCLUDE_DIRS = [".", "include"]

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
# round identically (results do not depend on thread count, tensor size or machine). -g0 undoes
# the -g of Python's build flags: the kernels' debug info was 31 of the library's 33 MB and 40 %
# of the kernel source's compile time (as torch's own wheels, the extension ships without it).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
# The kernels are explicit SIMD (at::vec); GCC 12's SLP vectorizer has miscompiled their scalar
# set-up (AVX-512: a gradient divisor reached lane 0 only; tests/test_fused_op.py), so it is off.
KERNEL_FLAGS = CXX_FLAGS + ["-fno-tree-slp-vectorize"]
LINK_FLAGS = ["-fopenmp"]


def capability_macros(capability: str) -> list[tuple[str, str | None]]:
    """The macros that compile the kernel source (and ATen's Vectorized) for ``capability``."""
    return [("CPU_CAPABILITY", capability), (f"CPU_CAPABILITY_{capability}", None)]
