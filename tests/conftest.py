"""Session setup shared by every test file: keep it minimal.

The Triton backend runs on CPU tensors only under the Triton interpreter, and triton reads
TRITON_INTERPRET when a kernel is defined (at import). Without a CUDA GPU, switch the interpreter
on before anything imports triton, so that available_backends("cpu") lists "triton" and the
generic backend tests (parity, AMP, bad input) cover it. A TRITON_INTERPRET already set wins.
Under the interpreter a kernel's helpers no longer re-patch triton.language at every call (speed
only; _patch_triton_language_once_per_launch says why that changes nothing).

ADAPTIVE_LR_TEST_TIMEOUT=<seconds> (scripts/gpu_check.sh sets it) ends the whole pytest process
when one test runs longer, after dumping every thread's stack (run pytest with -s to see it): a
kernel that hangs the device blocks in C, where no Python-level timeout could interrupt it."""

import faulthandler
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_triton_language_once_per_launch():
    """Triton's interpreter patches triton.language (inspect.getmembers over tl, tl.tensor and
    tl.math) at a kernel's launch and again at every call of a @triton.jit helper inside it: the
    repeats took a third of the Triton tests' time. A repeat changes nothing where the launch has
    patched the helper's modules already (only builtins are replaced, and a replaced one is no
    builtin; the other attributes are set to the same functions again), so it is skipped there.
    Speed only: where the interpreter has no _patch_lang (another triton) it is left as it is."""
    import triton.language as tl
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang", None)
    if patch is None:
        return
    # triton 3.9 returns a scope that the launch restores afterwards, 3.4 returns None
    no_patch = getattr(interpreter, "_LangPatchScope", lambda: None)

    def patch_unless_patched(fn):
        langs = [value for value in fn.__globals__.values() if value is tl or value is tl.core]
        if langs and not any(tl.core.is_builtin(lang.load) for lang in langs):
            return no_patch()
        return patch(fn)

    interpreter._patch_lang = patch_unless_patched


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _patch_triton_language_once_per_launch()

_TIMEOUT = float(os.environ.get("ADAPTIVE_LR_TEST_TIMEOUT", 0))


def pytest_collection_modifyitems(items):
    """The slow (end-to-end) tests first: under pytest-xdist (the test command's -n 2) the wheel
    check, collected late, ran alone for minutes at the end while the other core idled."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if _TIMEOUT > 0:
        print(f"\n[per-test timeout {_TIMEOUT:g} s] running {item.nodeid}", flush=True)
        faulthandler.dump_traceback_later(_TIMEOUT, exit=True)
    try:
        yield
    finally:
        if _TIMEOUT > 0:
            faulthandler.cancel_dump_traceback_later()
