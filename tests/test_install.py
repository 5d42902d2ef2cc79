"""The installed package: the environment variables that configure it (ADAPTIVE_LR_BACKEND,
ADAPTIVE_LR_JIT), the fused kernels compiled on first use where adaptive_lr._C does not load, and
(slow) the wheel installed into a fresh virtual environment (scripts/check_wheel.sh)."""

import pytest
import torch

from adaptive_lr import ActiveAdamW, backends


def _params():
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize("value", ["CPU", "fused", "auto "])
def test_a_bad_backend_variable_names_itself_the_value_and_the_choices(value, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_LR_BACKEND", value)
    with pytest.raises(ValueError) as error:
        ActiveAdamW(_params(), steps_per_epoch=None)
    assert str(error.value) == (
        f"ADAPTIVE_LR_BACKEND={value!r} is no adaptive_lr backend; choose one of auto, "
        "reference, foreach, cpu, cuda, triton")


def test_an_unavailable_backend_from_the_variable_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("ADAPTIVE_LR_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"^adaptive_lr backend 'cuda' \(chosen by "
                                           r"ADAPTIVE_LR_BACKEND\) is unavailable on cpu: "):
        ActiveAdamW(_params(), steps_per_epoch=None)


def test_the_backend_variable_overrides_auto_only_and_empty_is_unset(monkeypatch):
    monkeypatch.delenv("ADAPTIVE_LR_BACKEND", raising=False)
    unset = backends.resolve("auto", "cpu")
    monkeypatch.setenv("ADAPTIVE_LR_BACKEND", "")
    assert backends.resolve("auto", "cpu") is unset
    monkeypatch.setenv("ADAPTIVE_LR_BACKEND", "reference")
    assert backends.resolve("auto", "cpu") is backends._module("reference").step
    assert backends.resolve("foreach", "cpu") is backends._module("foreach").step
