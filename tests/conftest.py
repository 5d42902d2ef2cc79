"""Session setup shared by every test file: keep it minimal.

The Triton backend runs on CPU tensors only under the Triton interpreter, and triton reads
TRITON_INTERPRET when a kernel is defined (at import). Without a CUDA GPU, switch the interpreter
on before anything imports triton, so that available_backends("cpu") lists "triton" and the
generic backend tests (parity, AMP, bad input) cover it. A TRITON_INTERPRET already set wins.

ADAPTIVE_LR_TEST_TIMEOUT=<seconds> (scripts/gpu_check.sh sets it) ends the whole pytest process
when one test runs longer, after dumping every thread's stack (run pytest with -s to see it): a
kernel that hangs the device blocks in C, where no Python-level timeout could interrupt it."""

import faulthandler
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
