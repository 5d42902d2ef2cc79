"""pytest-benchmark view of the step-time benchmark (1M params, fp32):
`pytest bench/test_step_time.py --benchmark-only`. Uses the same contenders and tensors as
`bench/step_time.py`; the side-by-side table with ratios and GB/s comes from that script."""

import pytest
import torch

import adaptive_lr
from adaptive_lr.benchmark import contenders, make_tensors

SIZE = 1_000_000
BACKENDS = [b for b in adaptive_lr.available_backends("cpu") if b != "reference"]
CONTENDERS = contenders(BACKENDS, SIZE)


@pytest.mark.parametrize("layout", ["4", "200"])
@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.name)
def test_step_time(benchmark, contender, layout):
    torch.set_num_threads(2)
    optimizer = contender.make(make_tensors(SIZE, layout, torch.float32))
    optimizer.step()  # state creation is not part of a step's cost
    benchmark(optimizer.step)
