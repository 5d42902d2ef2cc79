"""The real models' parameter lists the step-time benchmark can step (adaptive_lr/model_shapes.py):
the published parameter and tensor counts of each architecture."""

import pytest
import torch

from adaptive_lr.benchmark import make_tensors
from adaptive_lr.model_shapes import MODELS, param_count


@pytest.mark.parametrize(("name", "params", "tensors"), [
    ("gpt2-small", 124_439_808, 148),
    ("bert-base", 109_482_240, 199),
    ("resnet50", 25_557_032, 161),
])
def test_model_parameter_counts(name, params, tensors):
    shapes = MODELS[name]()
    assert (param_count(shapes), len(shapes)) == (params, tensors)


def test_the_benchmark_steps_a_models_own_tensors():
    shapes = MODELS["resnet50"]()
    params = make_tensors(param_count(shapes), "resnet50", torch.float32)
    assert [tuple(p.shape) for p in params] == shapes
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
