"""Session setup shared by every test file: keep it minimal.

The Triton backend runs on CPU tensors only under the Triton interpreter, and triton reads
TRITON_INTERPRET when a kernel is defined (at import). Without a CUDA GPU, switch the interpreter
on before anything imports triton, so that available_backends("cpu") lists "triton" and the
generic backend tests (parity, AMP, bad input) cover it. A TRITON_INTERPRET already set wins."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
