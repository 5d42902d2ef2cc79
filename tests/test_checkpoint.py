"""state_dict round trips, through files loaded with ``map_location="cpu"`` and ``weights_only=True``:
mid-epoch resume is exact, a state dict saved by any backend resumes on any other, loading keeps
the backend the optimizer was built with, a checkpoint saved by an earlier version still resumes,
and a state dict that does not fit raises before anything changes. Saving and resuming run on
every device present, so a state dict also moves between CPU and CUDA."""

import copy
import importlib
import math
import pickle
from pathlib import Path

import pytest
import torch

from adaptive_lr import (
    Active, ActiveAdaBelief, ActiveAdam, ActiveAdamW, ActiveLion, ActiveRAdam, ActiveSGD,
    available_backends,
)
from fixtures import make_checkpoints
from optim_configs import (
    CLASSES, CONFIGS, DEVICES, clone_params, configs, device_backends, grad_sequence, make_params,
    on_cpu, run,
)

BACKENDS = available_backends("cpu")
DEVICE_BACKENDS = device_backends()
FIXTURES = Path(__file__).parent / "fixtures"


def _feed(opt, params, grads, skip=(), first_step=0):
    """One step per entry of grads; ``skip`` holds (step, param index) pairs without a grad."""
    for t, step_grads in enumerate(grads, start=first_step):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if (t, i) in skip else g.to(p.device, p.dtype, copy=True)
        opt.step()


def _through_file(obj, tmp_path):
    """What a training script gets back: torch.save to a file, torch.load onto the CPU with
    weights_only=True (tensors and plain containers only, nothing that runs code)."""
    path = tmp_path / "checkpoint.pt"
    torch.save(obj, path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(opt, params, expected_opt, expected_params, tol):
    """Gains, signs and step counts identical; params and moments equal within ``tol``; every
    state tensor of the same dtype (``expected_opt`` on the CPU, ``opt`` on any device)."""
    for p, state, e in zip(*on_cpu(params, opt), expected_params):
        torch.testing.assert_close(p, e.detach(), rtol=tol, atol=tol)
        expected = expected_opt.state[e]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            if not isinstance(value, torch.Tensor):
                assert state[key] == value, key
            elif key in ("gain", "prev_sign", "step"):
                assert torch.equal(state[key], value), key
            else:
                torch.testing.assert_close(state[key], value, rtol=tol, atol=tol, msg=key)
            if isinstance(value, torch.Tensor):
                assert state[key].dtype == value.dtype, key  # fp32 gains of a bf16 param stay fp32


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_resume_mid_epoch_continues_identically(config, dtype, tmp_path):
    params = make_params(dtype)
    grads = grad_sequence([tuple(p.shape) for p in params], 16, dtype)
    opt = config.make(params, backend="reference")
    _feed(opt, params, grads[:8])  # mid-epoch (3 steps per epoch), after two gain boundaries
    saved = _through_file({"params": [p.detach() for p in params], "opt": opt.state_dict()}, tmp_path)
    _feed(opt, params, grads[8:])

    resumed_params = clone_params(saved["params"])
    resumed = config.make(resumed_params, backend="reference")
    resumed.load_state_dict(saved["opt"])
    _feed(resumed, resumed_params, grads[8:])
    _assert_same_state(resumed, resumed_params, opt, params, tol=0)
    assert resumed.param_groups[0]["epoch"] == opt.param_groups[0]["epoch"]


@pytest.mark.parametrize("copy_optimizer", [copy.deepcopy, lambda opt: pickle.loads(pickle.dumps(opt))],
                         ids=["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_its_settings_and_continues_identically(copy_optimizer):
    """deepcopy and pickle (used by e.g. model-averaging and checkpointing tools) keep the
    backend and the epoch length, which torch.optim.Optimizer alone would drop."""
    config = configs("defaults", cls=ActiveAdamW)[0]
    params = make_params(torch.float64)
    grads = grad_sequence([tuple(p.shape) for p in params], 12, torch.float64)
    opt = config.make(params, backend="foreach")
    _feed(opt, params, grads[:4])
    copied = copy_optimizer({"params": params, "opt": opt})
    assert (copied["opt"].backend, copied["opt"].steps_per_epoch) == ("foreach", opt.steps_per_epoch)
    _feed(opt, params, grads[4:])
    _feed(copied["opt"], copied["params"], grads[4:])
    _assert_same_state(copied["opt"], copied["params"], opt, params, tol=0)


@pytest.fixture
def backends_run(monkeypatch):
    """The names of the backends that step buckets, in order: every backend's step is wrapped
    (before an optimizer resolves it) to record its name."""
    ran = []
    for name in {backend for device in DEVICES for backend in available_backends(device)}:
        module = importlib.import_module(f"adaptive_lr.backends.{name}")
        monkeypatch.setattr(module, "step",
                            lambda bucket, name=name, step=module.step: (ran.append(name), step(bucket)))
    return ran


# one config per optimizer, amsgrad on where it exists: every kind of state crosses backends
CROSSING = [(configs("amsgrad", cls=cls) or configs("defaults", cls=cls))[0] for cls in CLASSES]
STEPS, SAVED_AT = 10, 7  # 3 steps per epoch: saved mid-epoch after two boundaries, one more after
SHAPES = [(5, 3), (4,), ()]  # few tensors: the Triton interpreter's time grows with their number
SKIP = {(3, 1), (4, 1), (5, 1), (6, 1), (7, 1)}  # param 1 misses boundaries on both sides of the save


@pytest.mark.parametrize(("source_device", "source"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("target_device", "target"), DEVICE_BACKENDS)
def test_state_saved_by_any_backend_resumes_on_any_other(source_device, source, target_device,
                                                         target, backends_run, tmp_path):
    """Saved by ``source`` on its device, loaded from a file (onto the CPU) into an optimizer built
    with ``target`` on its device, continued: the same as an uninterrupted reference run (float64,
    to rounding), stepped by ``target`` only."""
    for config in CROSSING:
        start = make_params(torch.float64, shapes=SHAPES)
        grads = grad_sequence(SHAPES, STEPS, torch.float64)
        exact_params, exact = run(config, torch.float64, STEPS, "reference", clone_params(start),
                                  grads, SKIP)
        saver_params = clone_params(start, device=source_device)
        saver = config.make(saver_params, backend=source)
        _feed(saver, saver_params, grads[:SAVED_AT], SKIP)
        saved = _through_file(
            {"params": [p.detach() for p in saver_params], "opt": saver.state_dict()}, tmp_path)

        params = clone_params(saved["params"], device=target_device)
        resumed = config.make(params, backend=target)
        resumed.load_state_dict(saved["opt"])
        backends_run.clear()
        _feed(resumed, params, grads[SAVED_AT:], SKIP, first_step=SAVED_AT)
        assert resumed.backend == target and set(backends_run) == {target}
        _assert_same_state(resumed, params, exact, exact_params, tol=1e-10)


def test_auto_backend_stays_auto_after_loading(backends_run, monkeypatch, tmp_path):
    monkeypatch.delenv("ADAPTIVE_LR_BACKEND", raising=False)
    params = make_params(torch.float32)
    grads = grad_sequence([tuple(p.shape) for p in params], 4, torch.float32)
    saver = ActiveAdamW(params, steps_per_epoch=2, backend="reference")
    _feed(saver, params, grads[:2])
    resumed = ActiveAdamW(params, steps_per_epoch=2)
    resumed.load_state_dict(_through_file(saver.state_dict(), tmp_path))
    backends_run.clear()
    _feed(resumed, params, grads[2:])
    assert resumed.backend == "auto"
    assert set(backends_run) == {"cpu" if "cpu" in BACKENDS else "foreach"}


def test_loaded_state_takes_the_layout_and_dtype_of_its_param(tmp_path):
    """A state dict saved from a contiguous float32 param loads into a channels_last bfloat16 one:
    the state gets the param's strides (the fused kernels read a param and its state as one flat
    array) and keeps the state dtypes of a bfloat16 param (compact: bfloat16 gain and epoch sum)."""
    source = torch.randn(2, 3, 4, 5, requires_grad=True)
    saver = ActiveAdamW([source], steps_per_epoch=2, backend="reference")
    _feed(saver, [source], [[torch.randn(2, 3, 4, 5)] for _ in range(3)])
    target = torch.nn.Parameter(
        source.detach().bfloat16().contiguous(memory_format=torch.channels_last))
    loader = ActiveAdamW([target], steps_per_epoch=2, backend="reference")
    loader.load_state_dict(_through_file(saver.state_dict(), tmp_path))
    for key, value in loader.state[target].items():
        if key in ("step", "epoch", "has_prev_sign", "rounding_seed"):  # 0-dim
            continue
        if isinstance(value, torch.Tensor):
            assert value.stride() == target.stride(), key
            expected_dtype = {"prev_sign": torch.int8, "gain": torch.bfloat16,
                              "grad_sum": torch.bfloat16}.get(key, torch.float32)
            assert value.dtype == expected_dtype, key
            assert torch.equal(value, saver.state[source][key]), key


def test_load_hooks_run():
    params = make_params(torch.float32)
    opt = ActiveAdamW(params, steps_per_epoch=2, backend="reference")
    saved = opt.state_dict()
    calls = []
    opt.register_load_state_dict_pre_hook(
        lambda optimizer, state_dict: {**state_dict, "param_groups": [
            dict(group, lr=0.5) for group in state_dict["param_groups"]]})
    opt.register_load_state_dict_post_hook(lambda optimizer: calls.append(optimizer))
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.5 and calls == [opt]


# ---- checkpoints saved by earlier versions --------------------------------------------------

VERSIONED = sorted(FIXTURES.glob("active_adamw_v*.expected.pt"))


def test_a_checkpoint_fixture_exists():
    assert any(path.name == "active_adamw_v0_1_0.expected.pt" for path in VERSIONED)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("expected_path", VERSIONED, ids=lambda path: path.name.split(".")[0])
def test_checkpoint_of_an_earlier_version_resumes(expected_path, device, backend):
    """The checkpoint file (model + optimizer) loads on every backend and device and continues to
    the values stored beside it when it was made (tests/fixtures/make_checkpoints.py)."""
    checkpoint = torch.load(expected_path.with_name(expected_path.name.replace(".expected", "")),
                            map_location="cpu", weights_only=True)
    expected = torch.load(expected_path, map_location="cpu", weights_only=True)
    model = make_checkpoints.make_model()
    model.load_state_dict(checkpoint["model"])
    model.to(device)
    optimizer = make_checkpoints.make_optimizer(model, backend)
    optimizer.load_state_dict(checkpoint["optimizer"])
    make_checkpoints.feed(model, optimizer, expected["grads"], make_checkpoints.STEPS_BEFORE_SAVE)
    for p, gain in zip(model.parameters(), expected["gains"]):
        assert torch.equal(optimizer.state[p]["gain"].cpu(), gain)
    for name, value in model.cpu().state_dict().items():
        torch.testing.assert_close(value, expected["model"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("cls", [ActiveSGD, ActiveLion], ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_from_before_the_sign_test_of_sgd_and_lion_resumes_with_the_papers_rule(
        cls, backend, tmp_path):
    """ActiveSGD and ActiveLion saved their groups without sign_threshold and no grad_sq_sum
    before they had the sign test: such a state dict (the paper's rule's, less that key) loads
    into an optimizer built with the default sign test, resumes with sign_threshold 0 and keeps
    no Q, as an uninterrupted run of the paper's rule."""
    config = configs("defaults", cls=cls)[0]  # the paper's rule (optim_configs)
    params = make_params(torch.float32)
    grads = grad_sequence([tuple(p.shape) for p in params], 14, torch.float32)
    opt = config.make(params, backend="reference")
    _feed(opt, params, grads[:8])
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        del group["sign_threshold"]
    assert not any("grad_sq_sum" in state for state in old["state"].values())
    saved = _through_file({"params": [p.detach() for p in params], "opt": old}, tmp_path)
    _feed(opt, params, grads[8:])

    resumed_params = clone_params(saved["params"])
    resumed = cls(resumed_params, lr=1e-2, steps_per_epoch=3, backend=backend)
    assert resumed.defaults["sign_threshold"] > 0
    resumed.load_state_dict(saved["opt"])
    assert [g["sign_threshold"] for g in resumed.param_groups] == [0.0]
    _feed(resumed, resumed_params, grads[8:])
    _assert_same_state(resumed, resumed_params, opt, params, tol=1e-6)


@pytest.mark.parametrize("wrapped", [False, True], ids=["ActiveLion", "Active(Adam)"])
def test_an_optimizer_pickled_before_relax_gains_unpickles_holding_its_gains(wrapped):
    """A pickled optimizer (torch.save of the object, a deepcopy) whose groups and defaults
    predate relax_gains steps afterwards with relax_gains False."""
    params = make_params(torch.float32)
    opt = (Active(torch.optim.Adam(params), steps_per_epoch=3) if wrapped
           else ActiveLion(params, steps_per_epoch=3))
    state = opt.__getstate__()
    for group in [state["defaults"], *opt.param_groups]:
        del group["relax_gains"]
    old = object.__new__(type(opt))
    old.__setstate__(state)
    assert [g["relax_gains"] for g in [old.defaults, *old.param_groups]] == [False, False]
    for grads in grad_sequence([tuple(p.shape) for p in params], 4, torch.float32):
        for p, g in zip(params, grads):
            p.grad = g
        old.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_from_before_relax_gains_resumes_holding_its_gains(backend, tmp_path):
    """Groups saved before relax_gains existed held their gains under the sign test: such a
    state dict loads into an optimizer built with relax_gains=True, resumes with False and goes
    on as the uninterrupted run of the rule it was saved with."""
    config = configs("relax_gains", cls=ActiveLion)[0]
    params = make_params(torch.float32)
    grads = grad_sequence([tuple(p.shape) for p in params], 14, torch.float32)
    opt = config.make(params, backend="reference")
    opt.param_groups[0]["relax_gains"] = False
    _feed(opt, params, grads[:8])
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        del group["relax_gains"]
    saved = _through_file({"params": [p.detach() for p in params], "opt": old}, tmp_path)
    _feed(opt, params, grads[8:])

    resumed_params = clone_params(saved["params"])
    resumed = config.make(resumed_params, backend=backend)
    assert resumed.defaults["relax_gains"]
    resumed.load_state_dict(saved["opt"])
    assert [g["relax_gains"] for g in resumed.param_groups] == [False]
    _feed(resumed, resumed_params, grads[8:])
    _assert_same_state(resumed, resumed_params, opt, params, tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_switching_the_sign_test_of_sgd_on_and_off_makes_and_drops_q(backend, tmp_path):
    """A group switched to k > 0 mid-run gets Q (of grad_sum's dtype) at its next step: +inf
    for the epoch under way (its sum G did not have Q beside it), the steps' g**2 from the next
    boundary on; a checkpoint keeps it, and switched back to the paper's rule the group drops
    it."""
    params = make_params(torch.float32)
    grads = grad_sequence([tuple(p.shape) for p in params], 12, torch.float32)
    opt = ActiveSGD(params, lr=1e-2, steps_per_epoch=3, sign_threshold=0.0, backend=backend)
    _feed(opt, params, grads[:4])
    assert not any("grad_sq_sum" in opt.state[p] for p in params)
    opt.param_groups[0]["sign_threshold"] = 1.0
    _feed(opt, params, grads[4:5])  # epoch 2's second step
    for p in params:
        q = opt.state[p]["grad_sq_sum"]
        assert q.dtype == torch.bfloat16 and q.shape == p.shape
        assert torch.equal(q, torch.full_like(q, math.inf))
    _feed(opt, params, grads[5:7])  # the boundary at step 7 resets Q: it holds that step's g**2
    for p, g in zip(params, grads[6]):
        assert torch.allclose(opt.state[p]["grad_sq_sum"].float(), g.float() ** 2, rtol=2**-7)
    saved = _through_file(opt.state_dict(), tmp_path)
    assert all("grad_sq_sum" in state for state in saved["state"].values())
    resumed = ActiveSGD(clone_params(params), lr=1e-2, steps_per_epoch=3, backend=backend)
    resumed.load_state_dict(saved)
    assert all(torch.equal(resumed.state[r]["grad_sq_sum"], opt.state[p]["grad_sq_sum"])
               for r, p in zip(resumed.param_groups[0]["params"], params))
    opt.param_groups[0]["sign_threshold"] = 0.0
    _feed(opt, params, grads[5:6])
    assert not any("grad_sq_sum" in opt.state[p] for p in params)


# ---- state dicts that do not fit ------------------------------------------------------------


def _trained(cls=ActiveAdamW, **kwargs):
    params = make_params(torch.float32)
    opt = cls(params, **{"lr": 1e-2, "steps_per_epoch": 2, "backend": "reference", **kwargs})
    _feed(opt, params, grad_sequence([tuple(p.shape) for p in params], 5, torch.float32))
    return params, opt


def _edited(state_dict, edit):
    bad = copy.deepcopy(state_dict)
    edit(bad)
    return bad


def _mismatched_state_dicts():
    good = _trained()[1].state_dict()
    torch_params = make_params(torch.float32)
    torch_sgd = torch.optim.SGD(torch_params, lr=0.1, momentum=0.9)
    _feed(torch_sgd, torch_params, grad_sequence([tuple(p.shape) for p in torch_params], 2,
                                                 torch.float32))
    return {
        "ActiveSGD": (_trained(ActiveSGD)[1].state_dict(), "another optimizer"),
        "ActiveRAdam": (_trained(ActiveRAdam)[1].state_dict(), "another optimizer"),
        "ActiveAdaBelief": (_trained(ActiveAdaBelief)[1].state_dict(), "another optimizer"),
        "ActiveAdam": (_trained(ActiveAdam)[1].state_dict(), "another optimizer"),
        "ActiveLion": (_trained(ActiveLion)[1].state_dict(), "another optimizer"),
        # torch.optim.AdamW's loads (tests/test_dropin.py); another torch optimizer's does not
        "torch.optim.SGD": (torch_sgd.state_dict(), "another optimizer"),
        "amsgrad": (_trained(amsgrad=True)[1].state_dict(),
                    r"amsgrad=True, the optimizer amsgrad=False; construct it with amsgrad=True"),
        "wrong shape": (_edited(good, lambda d: d["state"][0].update(exp_avg=torch.zeros(99))),
                        r"state 'exp_avg' of param 0 has shape \(99,\), its param \(5, 3\)"),
        "missing key": (_edited(good, lambda d: d["state"][1].pop("gain")), r"missing \['gain'\]"),
        # Q is kept only where no second moment measures the noise
        "Q of an optimizer with a second moment": (
            _edited(good, lambda d: d["state"][1].update(grad_sq_sum=torch.zeros(17))),
            r"unexpected \['grad_sq_sum'\]"),
        "param count": (_edited(good, lambda d: d["param_groups"][0]["params"].pop()),
                        "param group 0 has 5 params, the state dict 4"),
        "group count": (_edited(good, lambda d: d["param_groups"].append(d["param_groups"][0])),
                        "the state dict has 2 param groups, the optimizer 1"),
        "unknown param": (_edited(good, lambda d: d["state"].update({1234: d["state"][0]})),
                          "unknown param 1234"),
        "epoch ahead of the clock": (_edited(good, lambda d: d["state"][2].update(epoch=99)),
                                     r"epoch=99 .* expected an int in \[0, 2\]"),
        "state not a tensor": (_edited(good, lambda d: d["state"][0].update(gain=[1.0])),
                               "'gain' of param 0 is not a tensor"),
        "no param groups": ({"state": {}}, "expects a dict with 'state' and 'param_groups'"),
        "not a dict": ([], "expects a dict, got list"),
    }


def _mismatched_q():
    """State dicts that do not fit an ActiveSGD with its sign test on (loaded into one)."""
    good = _trained(ActiveSGD, sign_threshold=1.0)[1].state_dict()
    return {
        "Q wrong shape": (_edited(good, lambda d: d["state"][0].update(grad_sq_sum=torch.zeros(7))),
                          r"state 'grad_sq_sum' of param 0 has shape \(7,\), its param \(5, 3\)"),
        "Q not floating": (_edited(good, lambda d: d["state"][1].update(
            grad_sq_sum=torch.zeros(17, dtype=torch.int32))),
            r"state 'grad_sq_sum' of param 1 has dtype torch.int32, expected a floating-point"),
        "Q not a tensor": (_edited(good, lambda d: d["state"][2].update(grad_sq_sum=0.5)),
                           "'grad_sq_sum' of param 2 is not a tensor"),
    }


@pytest.mark.parametrize("case", list(_mismatched_state_dicts()) + list(_mismatched_q()))
def test_bad_state_dict_raises_and_changes_nothing(case):
    if case in _mismatched_q():
        bad, message = _mismatched_q()[case]
        params, opt = _trained(ActiveSGD, sign_threshold=1.0)
    else:
        bad, message = _mismatched_state_dicts()[case]
        params, opt = _trained()
    param_values = [p.detach().clone() for p in params]
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    group_params = [list(g["params"]) for g in opt.param_groups]
    state_objects = [dict(opt.state[p]) for p in params]
    state_values = copy.deepcopy(state_objects)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert all(torch.equal(p, v) for p, v in zip(params, param_values))
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert all(a is b for g, ps in zip(opt.param_groups, group_params) for a, b in zip(g["params"], ps))
    assert len(opt.state) == len(params)
    for p, objects, values in zip(params, state_objects, state_values):
        assert opt.state[p].keys() == objects.keys()
        for key, value in opt.state[p].items():
            assert value is objects[key]  # the same tensors, not replaced
            assert torch.equal(value, values[key]) if isinstance(value, torch.Tensor) else value == values[key]
