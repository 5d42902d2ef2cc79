"""Bad input gets a clear error up front, and a failed step changes nothing (on every device
present)."""

import copy

import pytest
import torch

from adaptive_lr import ActiveAdamW
from adaptive_lr.gain_rule import GAIN_KEYS, GainRule
from optim_configs import CLASSES, INFOS, device_backends

DEVICE_BACKENDS = device_backends()


def _make(cls, params, **kwargs):
    kwargs.setdefault("steps_per_epoch", 2)
    return cls(params, lr=kwargs.pop("lr", 0.1), **kwargs)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(gain_inc=-1.0), "gain_inc"),
        (dict(gain_dec=0.0), "gain_dec"),
        (dict(gain_dec=1.5), "gain_dec"),
        (dict(min_gain=1.5), "min_gain"),
        (dict(max_gain=0.5), "max_gain"),
        (dict(min_gain=-0.1), "min_gain"),
        (dict(steps_per_epoch=0), "steps_per_epoch"),
        (dict(steps_per_epoch=2.5), "steps_per_epoch"),
        (dict(backend="fastest"), "unknown backend"),
    ],
)
def test_invalid_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _make(cls, [torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    pytest.param(info.cls, kwargs, message, id=f"{info.cls.__name__}-{message}")
    for info in INFOS for kwargs, message in info.error_inputs
])
def test_invalid_optimizer_specific_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _make(cls, [torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("value", ["2", True, 1j], ids=repr)
def test_a_sign_threshold_that_is_no_real_number_is_a_type_error(cls, value):
    with pytest.raises(TypeError, match="sign_threshold must be a real number"):
        _make(cls, [torch.zeros(2, requires_grad=True)], sign_threshold=value)


@pytest.mark.parametrize("cls", CLASSES)
def test_relax_gains_that_is_no_bool_is_a_type_error(cls):
    with pytest.raises(TypeError, match="relax_gains must be a bool, got 1"):
        _make(cls, [torch.zeros(2, requires_grad=True)], relax_gains=1)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_nan_sign_threshold_is_refused(cls):
    with pytest.raises(ValueError, match="sign_threshold must be finite and >= 0, got nan"):
        _make(cls, [torch.zeros(2, requires_grad=True)], sign_threshold=float("nan"))


def test_per_group_hyperparameters_are_validated():
    opt = ActiveAdamW([torch.zeros(2, requires_grad=True)], steps_per_epoch=2)
    with pytest.raises(ValueError, match="gain_dec"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "gain_dec": 3.0})
    assert len(opt.param_groups) == 1


def test_non_floating_params_are_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        ActiveAdamW([torch.zeros(2, dtype=torch.int64)], steps_per_epoch=2)


def test_params_on_different_devices_in_one_group_are_rejected():
    with pytest.raises(ValueError, match="one device"):
        ActiveAdamW([torch.zeros(2, requires_grad=True), torch.zeros(2, device="meta")],
                    steps_per_epoch=2)


def test_unavailable_backend_fails_at_construction():
    with pytest.raises(RuntimeError, match="'cuda' is unavailable on cpu"):
        ActiveAdamW([torch.zeros(2, requires_grad=True)], steps_per_epoch=2, backend="cuda")


def _trained(cls, backend, device="cpu"):
    params = [torch.randn(3, 2, device=device, requires_grad=True),
              torch.randn(4, device=device, requires_grad=True)]
    opt = _make(cls, params, backend=backend)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def _assert_unchanged(params, opt, before_params, before_state):
    for p, q in zip(params, before_params):
        assert torch.equal(p, q)
    after = opt.state_dict()
    assert after["param_groups"] == before_state["param_groups"]
    for key, state in before_state["state"].items():
        for name, value in state.items():
            other = after["state"][key][name]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
def test_sparse_gradient_raises_and_changes_nothing(cls, device, backend):
    params, opt = _trained(cls, backend, device)
    before_params, before_state = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    params[0].grad = torch.randn_like(params[0])
    params[1].grad = torch.randn(4, device=device).to_sparse()
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        opt.step()
    _assert_unchanged(params, opt, before_params, before_state)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_mismatched_grad_raises_and_changes_nothing(device, backend):
    params, opt = _trained(ActiveAdamW, backend, device)
    before_params, before_state = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    params[0].grad = torch.randn_like(params[0])
    params[1].grad_dtype = None  # torch itself refuses the mismatch unless told to allow it
    params[1].grad = torch.randn(4, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="does not match its param"):
        opt.step()
    _assert_unchanged(params, opt, before_params, before_state)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_params_without_grad_are_skipped(device, backend):
    used, unused = (torch.randn(3, device=device, requires_grad=True) for _ in range(2))
    opt = ActiveAdamW([used, unused], steps_per_epoch=2, backend=backend)
    before = unused.detach().clone()
    used.grad = torch.ones(3, device=device)
    opt.step()
    assert torch.equal(unused, before) and len(opt.state[unused]) == 0
    assert opt.state[used]["step"].item() == 1


def test_a_step_whose_backend_fails_keeps_its_epoch_boundary(monkeypatch):
    """A backend that fails before writing (an op rejecting its input) comes after the optimizer
    planned the step (state created, boundaries due): the failed step changes nothing, and the
    boundary it was to fuse is still applied by the retried step."""
    from adaptive_lr.backends import reference

    grads = [torch.randn(3, 2) for _ in range(7)]
    runs = []
    for fail_last_step in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(3, 2, requires_grad=True)]
        opt = _make(ActiveAdamW, params, backend="reference", steps_per_epoch=3,
                    sign_threshold=0.0)  # the paper's rule: the boundary moves gains
        for t, g in enumerate(grads):
            params[0].grad = g.clone()
            if t == 6 and fail_last_step:  # step 7 fuses the first sign-comparing boundary
                before_params = [p.detach().clone() for p in params]
                before_state = copy.deepcopy(opt.state_dict())
                with monkeypatch.context() as patch:
                    patch.setattr(reference, "step", _rejecting_step)
                    with pytest.raises(RuntimeError, match="rejected"):
                        opt.step()
                _assert_unchanged(params, opt, before_params, before_state)
            opt.step()
        runs.append((params[0].detach(), opt.state[params[0]]))
    (p_expected, expected), (p_retried, retried) = runs
    assert not torch.equal(expected["gain"], torch.ones_like(expected["gain"]))  # the boundary changed gains
    assert torch.equal(p_retried, p_expected)
    for key in ("gain", "grad_sum", "prev_sign", "exp_avg", "exp_avg_sq", "step", "epoch"):
        assert torch.equal(retried[key], expected[key]), key


def _rejecting_step(bucket):
    raise RuntimeError("rejected")


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("lr", [torch.tensor(0.1, dtype=torch.bfloat16), torch.tensor([0.1, 0.2])],
                         ids=["bfloat16", "two-elements"])
def test_a_bad_lr_set_after_construction_fails_the_step_before_any_group_moves(device, backend,
                                                                                 lr):
    """Every group's lr is checked before the first bucket runs: a bad lr in the second group
    used to fail in its fused op after the first group had been stepped."""
    params = [torch.randn(3, 2, device=device, requires_grad=True),
              torch.randn(4, device=device, requires_grad=True)]
    opt = ActiveAdamW([{"params": params[:1]}, {"params": params[1:]}], steps_per_epoch=2,
                      backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before_params, before_state = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    opt.param_groups[1]["lr"] = lr
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    opt.param_groups[1]["lr"] = before_state["param_groups"][1]["lr"]
    _assert_unchanged(params, opt, before_params, before_state)


# a bad value edited into a param group mid-run (a buggy scheduler), and the constructor's words
_GROUP_ERRORS = ((dict(lr=-1.0), "learning rate"), (dict(weight_decay=-0.1), "weight_decay"),
                 (dict(gain_inc=-1.0), "gain_inc"), (dict(gain_inc="2"), "gain_inc must be a real"),
                 (dict(gain_dec=2.0), "gain_dec"), (dict(min_gain=1.5), "min_gain"),
                 (dict(max_gain=0.5), "max_gain"))


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("cls", "edit", "message"), [
    pytest.param(info.cls, edit, message, id=f"{info.cls.__name__}-{next(iter(edit.items()))}")
    for info in INFOS for edit, message in _GROUP_ERRORS + info.error_inputs
])
def test_a_bad_hyperparameter_set_mid_run_fails_the_step_before_any_group_moves(
        device, backend, cls, edit, message):
    """Every group is validated before the first tensor is written, with the constructor's
    errors: on the cpu backend a bad second group used to raise after the first had stepped,
    and reference/foreach accepted eps=-1 (params became -inf) or gain_dec=2."""
    params = [torch.randn(3, 2, device=device, requires_grad=True),
              torch.randn(4, device=device, requires_grad=True)]
    opt = _make(cls, [{"params": params[:1]}, {"params": params[1:]}], backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before_params, before_state = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    opt.param_groups[1].update(edit)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.step()
    opt.param_groups[1].update({k: before_state["param_groups"][1][k] for k in edit})
    _assert_unchanged(params, opt, before_params, before_state)


@pytest.mark.parametrize("key", GAIN_KEYS)
def test_a_group_without_a_gain_key_fails_the_step_naming_it(key):
    """The gain rule is read from a group strictly: a missing key (sign_threshold too) is an
    error naming it, never a default."""
    p = torch.zeros(2, requires_grad=True)
    opt = _make(ActiveAdamW, [p])
    p.grad = torch.ones(2)
    del opt.param_groups[0][key]
    with pytest.raises(ValueError, match=rf"the param group has no \['{key}'\]"):
        opt.step()
    with pytest.raises(ValueError, match=rf"GainRule: the param group has no \['{key}'\]"):
        GainRule.from_group(opt.param_groups[0])


@pytest.mark.parametrize("lr,message", [
    (torch.tensor(0.1, dtype=torch.bfloat16), "float32 or float64, got torch.bfloat16"),
    (torch.tensor([0.1, 0.2]), "Tensor lr must be 1-element"),
    (torch.tensor(0.1, device="meta"), "on the CPU or on its params' device"),
])
def test_a_bad_tensor_lr_in_a_later_group_fails_at_construction(lr, message):
    first, second = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        ActiveAdamW([{"params": [first]}, {"params": [second], "lr": lr}], steps_per_epoch=2)
