"""Each fused kernel's arguments are declared in three places, which must agree: the optimizer's
spec (adaptive_lr/optim/<name>.py: the names ``kernel_hyper`` gives, ``state``,
``second_moment``), the C++ kernel's tag (csrc/include/adaptive_lr/math.h: ``kHyper``,
``kStates``, ``kSecondMoment``, as the op ``kernel_signature`` reports them) and the Triton update
(kernels/updates.py: ``UPDATES``). The backends hand the hyperparameters over by name, in each
kernel's own order; a state order or a second-moment index that differed would go unnoticed
until a result did."""

import dataclasses

import pytest
import torch

import adaptive_lr  # noqa: F401  (imports every Active optimizer)
from adaptive_lr.backends import extension, fused
from adaptive_lr.optim import ActiveOptimizer

OPTIMIZERS = sorted(ActiveOptimizer.__subclasses__(), key=lambda cls: cls.__name__)
SPECS = [cls.spec for cls in OPTIMIZERS]
_NOT_BUILT = extension.load_error()
cpp = pytest.mark.skipif(_NOT_BUILT is not None, reason=f"the C++ kernels: {_NOT_BUILT}")


def _record(cls):
    """A record of the optimizer's defaults (lr, which ActiveSGD requires, aside)."""
    opt = cls([torch.zeros(2, requires_grad=True)], lr=1e-3, steps_per_epoch=100,
              backend="reference")
    return cls.spec.record(opt.param_groups[0])


def _spec_signature(cls) -> tuple[set[str], tuple[str, ...], int]:
    """The spec's hyperparameter names (a set: each backend orders them), its state keys in
    order, and its second moment's index among them (-1: none), as the C++ op reports a tag's."""
    spec = cls.spec
    moment = -1 if spec.second_moment is None else spec.state.index(spec.second_moment)
    return set(spec.kernel_hyper(_record(cls))), spec.state, moment


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_an_amsgrad_maximum_is_the_last_state(cls):
    """The kernels take amsgrad's running maximum as the optional last state list."""
    spec = cls.spec
    names, state, _ = _spec_signature(cls)
    assert ("amsgrad" in names) == (spec.amsgrad_state is not None)
    assert spec.amsgrad_state in (None, state[-1])


@cpp
def test_every_cpp_kernel_is_a_spec_and_back():
    assert sorted(torch.ops.adaptive_lr.kernel_names()) == sorted(spec.kernel for spec in SPECS)


@cpp
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_the_cpp_kernel_declares_what_the_spec_does(cls):
    hyper, states, second_moment = torch.ops.adaptive_lr.kernel_signature(cls.spec.kernel)
    assert (set(hyper), tuple(states), second_moment) == _spec_signature(cls)
    assert len(hyper) == len(set(hyper))


@cpp
def test_a_hyperparameter_the_cpp_kernel_does_not_name_is_refused():
    spec = next(spec for spec in SPECS if spec.kernel == "lion")
    h = _record(next(cls for cls in OPTIMIZERS if cls.spec is spec))
    assert fused.kernel_hyper(spec, h) == [h.betas[0], h.betas[1]]
    renamed = dataclasses.replace(spec, kernel_hyper=lambda h: {"beta1": 0.9, "beta_2": 0.99})
    with pytest.raises(ValueError, match=r"the spec of kernel 'lion' names the hyperparameters "
                       r"\('beta1', 'beta_2'\), its C\+\+ kernel takes \('beta1', 'beta2'\)"):
        fused.kernel_hyper(renamed, h)
    extra = dataclasses.replace(spec, kernel_hyper=lambda h: dict(spec.kernel_hyper(h), eps=0.0))
    with pytest.raises(ValueError, match="names the hyperparameters"):
        fused.kernel_hyper(extra, h)


def _updates():
    pytest.importorskip("triton")
    from adaptive_lr.kernels import UPDATES

    return UPDATES


def test_every_triton_update_is_a_spec_and_back():
    assert sorted(_updates()) == sorted(spec.kernel for spec in SPECS)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_the_triton_update_declares_what_the_spec_does(cls):
    update = _updates()[cls.spec.kernel]
    moment = -1 if update.second_moment is None else update.second_moment
    assert (set(update.hyper), update.state, moment) == _spec_signature(cls)
    assert len(update.hyper) == len(set(update.hyper))
    assert update.second_moment is None or "beta2" in update.hyper  # the sign test reads it
