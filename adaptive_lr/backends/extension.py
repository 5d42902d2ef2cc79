"""Loads the library of fused kernels that registers the ``torch.ops.adaptive_lr`` ops: the
ahead-of-time build ``adaptive_lr._C`` when it imports; else (a pure-Python install, or a torch
upgraded under it) the same C++ sources, shipped as adaptive_lr/csrc, compiled just in time on first
use for this machine's CPU capability, with ninja, and cached in ``$XDG_CACHE_HOME/adaptive_lr``
(default ``~/.cache/adaptive_lr``) per adaptive_lr version, torch version, Python and capability.
``ADAPTIVE_LR_JIT=0`` turns the just-in-time build off."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import sysconfig
import warnings

import torch

from . import cpu_build

JIT_VARIABLE = "ADAPTIVE_LR_JIT"


@functools.cache
def load_error() -> str | None:
    """Loads the kernels (on first use); None when they are loaded, else why they cannot be."""
    try:
        from .. import _C  # noqa: F401
        return None
    except (ImportError, OSError) as error:  # not built, or built against another torch
        not_loaded = f"adaptive_lr._C does not load ({error})"
    setting = os.environ.get(JIT_VARIABLE, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{JIT_VARIABLE}={setting!r}: expected 1 (compile the fused CPU kernels "
                         "on first use, the default) or 0 (never)")
    if setting == "0":
        return (f"{not_loaded}, and {JIT_VARIABLE}=0 turns off compiling the kernels on first "
                f"use: unset {JIT_VARIABLE}, or reinstall adaptive_lr with torch importable at "
                "build time (pip install --no-build-isolation)")
    return _compile(not_loaded)


def cache_root() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "adaptive_lr")


def _sources() -> str:
    """The csrc/ directory: in the package when installed from a wheel, beside it in a source
    checkout (an editable install)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    installed = os.path.join(package, "csrc")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), "csrc")


@contextlib.contextmanager
def _scripts_on_path():
    """torch runs `ninja` from PATH: this puts first the one pip installed beside this Python (a
    virtual environment used without activating it)."""
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _runnable_capability() -> str:
    """ATen's SIMD choice, as the ahead-of-time build's launcher takes it, lowered to what this CPU
    can execute: ATen believes ``ATEN_CPU_CAPABILITY`` without asking the CPU."""
    chosen = torch.backends.cpu.get_cpu_capability()
    runnable = chosen if chosen in cpu_build.CPU_CAPABILITIES else "DEFAULT"
    if runnable == "AVX512" and not torch.cpu._is_avx512_supported():
        runnable = "AVX2"
    if runnable == "AVX2" and not torch.cpu._is_avx2_supported():
        runnable = "DEFAULT"
    if runnable != chosen and chosen in cpu_build.CPU_CAPABILITIES:
        warnings.warn(f"adaptive_lr: torch chose {chosen} (ATEN_CPU_CAPABILITY?) but this CPU "
                      f"cannot run it; the fused CPU kernels run {runnable}", stacklevel=3)
    return runnable


def _compile(not_loaded: str) -> str | None:
    """Compiles (once) and loads the kernels for this machine; None, or why that failed."""
    from torch.utils import cpp_extension

    from .. import __version__

    capability = _runnable_capability()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    # the cache key: a library fits only the versions it was compiled with
    name = re.sub(r"\W", "_", f"adaptive_lr_{__version__}_torch_{torch.__version__}_{python}_"
                              f"{capability}")
    build_dir = os.path.join(cache_root(), name)
    csrc = _sources()
    defines = [f"-D{macro}" if value is None else f"-D{macro}={value}"
               for macro, value in cpu_build.capability_macros(capability)]
    with _scripts_on_path():
        if not cpp_extension.is_ninja_available():
            return (f"{not_loaded}, and compiling the kernels on first use needs ninja: "
                    "pip install ninja")
        if not os.path.exists(os.path.join(build_dir, f"{name}.so")):
            print(f"adaptive_lr: building the fused CPU kernels for torch {torch.__version__} "
                  f"({capability}), once, ~1 min, in {build_dir} ({JIT_VARIABLE}=0 skips "
                  "this)...", file=sys.stderr, flush=True)
        os.makedirs(build_dir, exist_ok=True)
        try:
            cpp_extension.load(
                name,
                [os.path.join(csrc, s) for s in cpu_build.SOURCES + cpu_build.KERNEL_SOURCES],
                extra_cflags=cpu_build.KERNEL_FLAGS + cpu_build.CPU_CAPABILITIES[capability]
                + defines + [f"-D{cpu_build.ONE_CAPABILITY_MACRO}"],
                extra_ldflags=cpu_build.LINK_FLAGS,
                extra_include_paths=[os.path.join(csrc, d) for d in cpu_build.INCLUDE_DIRS],
                build_directory=build_dir, is_python_module=False)
        except (RuntimeError, OSError) as error:  # no compiler, a compile error, a bad library
            return f"{not_loaded}, and compiling the kernels on first use failed: {error}"
    return None
