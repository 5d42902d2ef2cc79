"""The lr tensor the fused kernels read (cpu and cuda ops, Triton kernel): one helper for every
fused backend."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

# The device tensor a float lr is read from, per bucket (keyed by its first param, which belongs
# to one param group), refreshed by fill_ (a kernel, no transfer, no host sync) only when the value
# changes. It lives as long as that param, so a CUDA graph that captured its address never reads
# freed memory while the model exists (an LRU cache would free it under a graph that never calls
# back into Python).
_FLOAT_LRS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):  # the stream the op will use: that device's current one
        return torch.cuda.is_current_stream_capturing()


def lr_tensor(lr, first_param: Tensor) -> Tensor:
    """``lr`` as a one-element tensor on ``first_param``'s device, for the kernels to read. A
    tensor lr is used as it is (a 0-dim lr that a scheduler changes in place then needs no new
    graph under torch.compile or CUDA graphs); a float lr is wrapped as float64 (every bit kept),
    on a GPU in a tensor cached per bucket."""
    device = first_param.device
    if isinstance(lr, Tensor):  # read in the kernel: in-place changes need no host work at all
        return lr.to(device)
    if device.type == "cpu":  # read by the host: nothing to keep alive, nothing to sync
        return torch.tensor(lr, dtype=torch.float64)
    lr = float(lr)
    entry = _FLOAT_LRS.get(first_param)
    if (entry is None or entry[0] != lr) and _capturing(device):
        # work enqueued during a capture runs only on replay: the cached value would be stale
        raise RuntimeError(
            "adaptive_lr: a float lr that the step before the capture did not use cannot be set "
            "inside a CUDA graph capture; pass lr as a device tensor and change it in place"
        )
    if entry is None:
        entry = _FLOAT_LRS[first_param] = [lr, torch.full((), lr, dtype=torch.float64,
                                                            device=device)]
    elif entry[0] != lr:
        entry[1].fill_(lr)
        entry[0] = lr
    return entry[1]


