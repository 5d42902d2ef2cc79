"""state_dict round trips: mid-epoch resume is exact, any backend loads any other's state, and
a state dict that does not fit raises before anything changes."""

import copy
import io

import pytest
import torch

from adaptive_lr import ActiveAdamW, ActiveRAdam, ActiveSGD, available_backends
from optim_configs import CONFIGS, clone_params, grad_sequence, make_params

BACKENDS = [b for b in available_backends("cpu")]


def _feed(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_resume_mid_epoch_continues_identically(config, dtype):
    params = make_params(dtype)
    grads = grad_sequence([tuple(p.shape) for p in params], 16, dtype)
    opt = config.make(params, backend="reference")
    _feed(opt, params, grads[:8])  # mid-epoch (3 steps per epoch), after two gain boundaries
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    _feed(opt, params, grads[8:])

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_params = clone_params(saved["params"])
    resumed = config.make(resumed_params, backend="reference")
    resumed.load_state_dict(saved["opt"])
    _feed(resumed, resumed_params, grads[8:])
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            other = resumed.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            if isinstance(value, torch.Tensor):
                assert other.dtype == value.dtype  # fp32 gains of a bf16 param stay fp32
    assert resumed.param_groups[0]["epoch"] == opt.param_groups[0]["epoch"]


@pytest.mark.parametrize("source", BACKENDS)
@pytest.mark.parametrize("target", BACKENDS)
def test_state_loads_across_backends(source, target):
    params = make_params(torch.float32)
    grads = grad_sequence([tuple(p.shape) for p in params], 12, torch.float32)
    opt = ActiveAdamW(params, steps_per_epoch=3, backend=source)
    _feed(opt, params, grads[:7])
    moved = clone_params(params)
    loaded = ActiveAdamW(moved, steps_per_epoch=3, backend=target)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert loaded.backend == target  # loading never switches the backend asked for
    _feed(opt, params, grads[7:])
    _feed(loaded, moved, grads[7:])
    for p, q in zip(params, moved):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        assert torch.equal(loaded.state[q]["gain"], opt.state[p]["gain"])


def _trained():
    params = make_params(torch.float32)
    opt = ActiveAdamW(params, steps_per_epoch=2, backend="reference")
    _feed(opt, params, grad_sequence([tuple(p.shape) for p in params], 5, torch.float32))
    return params, opt


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _mismatched_state_dicts():
    params, opt = _trained()
    good = opt.state_dict()
    sgd_params = make_params(torch.float32)
    sgd = ActiveSGD(sgd_params, lr=0.1, steps_per_epoch=2, backend="reference")
    _feed(sgd, sgd_params, grad_sequence([tuple(p.shape) for p in sgd_params], 3, torch.float32))
    radam_params = make_params(torch.float32)
    radam = ActiveRAdam(radam_params, steps_per_epoch=2, backend="reference")
    _feed(radam, radam_params, grad_sequence([tuple(p.shape) for p in radam_params], 3, torch.float32))
    wrong_shape = copy.deepcopy(good)
    wrong_shape["state"][0]["exp_avg"] = torch.zeros(99)
    missing_key = copy.deepcopy(good)
    del missing_key["state"][1]["gain"]
    extra_group = copy.deepcopy(good)
    extra_group["param_groups"].append(copy.deepcopy(extra_group["param_groups"][0]))
    unknown_param = copy.deepcopy(good)
    unknown_param["state"][1234] = unknown_param["state"][0]
    return {
        "other optimizer (SGD)": (sgd.state_dict(), "another optimizer"),
        "other optimizer (RAdam)": (radam.state_dict(), "another optimizer"),
        "wrong shape": (wrong_shape, "shape"),
        "missing key": (missing_key, "missing"),
        "group count": (extra_group, "param groups"),
        "unknown param": (unknown_param, "unknown param"),
        "not a state dict": ({"foo": 1}, "expects a dict"),
    }


@pytest.mark.parametrize("case", list(_mismatched_state_dicts()))
def test_bad_state_dict_raises_and_changes_nothing(case):
    bad, message = _mismatched_state_dicts()[case]
    params, opt = _trained()
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    after = _snapshot(opt)
    assert after["param_groups"] == before["param_groups"]
    for key in before["state"]:
        for name, value in before["state"][key].items():
            other = after["state"][key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
