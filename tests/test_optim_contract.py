"""PyTorch's generic optimizer contract, ported from torch's test/test_optim.py (TestOptimRenewed)
and torch/testing/_internal/common_optimizers.py: what any torch.optim.Optimizer promises about
param groups, names, hooks, grads, tensor learning rates, state dicts, misuse and training under
every torch LR scheduler. Every Active optimizer runs on every CPU backend (triton under the
interpreter, on fewer steps); the config table's variants run where options matter.

Where the outcome should be torch's, it is computed by running torch's own optimizer (the
"twin") on the same input, so these tests follow the installed torch. Where we differ from torch
by design, a test pins our behaviour and says why."""

import copy
import io
import itertools
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import SWALR
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from adaptive_lr import (
    ActiveAdaBelief,
    ActiveAdamW,
    ActiveRAdam,
    ActiveSGD,
    GreedyLR,
    available_backends,
)
from optim_configs import CLASSES, CONFIGS, INFOS

BACKENDS = available_backends("cpu")
# torch's closest optimizer to each: same hyperparameter checks, same state dict layout rules
TWIN = {info.cls: info.twin for info in INFOS}
CLS_BACKEND = [
    pytest.param(cls, backend, id=f"{cls.__name__}-{backend}")
    for cls in CLASSES
    for backend in BACKENDS
]
# for checks of what the shared base class does alone (planning, names, state dict bookkeeping):
# the slow interpreted triton backend would add time and no coverage
CLS_FAST_BACKEND = [p for p in CLS_BACKEND if p.values[1] != "triton"]
LR = 2.0**-6  # exact in float32, so a tensor lr and a float lr give bit-identical steps
SPE = 2  # steps per epoch: the first gain update happens at step 5


def _steps(backend, n):
    """The interpreted triton backend takes 50-250 ms a step: fewer steps there, but always up
    to step 5, the first that moves gains."""
    return min(n, 5) if backend == "triton" else n


def _triton_subset(config):
    """One config per optimizer class on triton (the interpreter is slow)."""
    return config.kwargs == {}


def _make(cls, params, backend="reference", **kwargs):
    kwargs = {"lr": LR, "steps_per_epoch": SPE, **kwargs}
    return cls(params, backend=backend, **kwargs)


def _training_epoch(cls, kwargs, steps_per_epoch):
    """The epoch length for a loss-goes-down test. ActiveSGD with momentum 0.9 overshoots with
    2- or 3-step epochs (the summed gradient keeps its sign while momentum carries the params
    past the minimum, so gains grow when they should shrink; a known issue, tracked apart from
    this contract): it gets 6-step epochs, with which its gains still move within the run."""
    if cls is ActiveSGD and kwargs.get("momentum", 0.9) >= 0.9:
        return 6
    return steps_per_epoch


def _regression(contiguous=True):
    """torch's _test_basic_cases problem, smaller: loss = |w x + b|^2, minimum 0."""
    gen = torch.Generator().manual_seed(0)
    if contiguous:
        w, b = torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)
    else:  # strided views, as torch's test_forloop_goes_right_direction(contiguous=False)
        w, b = torch.randn(4, 3, 2, generator=gen)[..., 0], torch.randn(4, 2, generator=gen)[..., 0]
    return nn.Parameter(w), nn.Parameter(b), torch.randn(3, generator=gen)


def _loss(w, b, x):
    return (w.mv(x) + b).pow(2).sum()


def _set_grads(params, step):
    """Seeded grads of a fixed sign bias, so that epoch sums persist and gains move."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        p.grad = (0.5 + torch.randn(p.shape, generator=gen)).to(p.dtype) * (1 if i % 2 else -1)


def _feed(opt, params, steps, first=0):
    for t in range(first, first + steps):
        _set_grads(params, t)
        opt.step()


def _fresh_params():
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(3, 2, generator=gen)),
            nn.Parameter(torch.randn(5, generator=gen))]


def _clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def _assert_equal_nested(a, b, path="state_dict"):
    """Exact equality of two state dicts: tensors by value and dtype, everything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: {a.keys()} != {b.keys()}"
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ---- misuse raises what torch raises (common_optimizers.py's optim_error_inputs_func_*) ----


def _param():
    return nn.Parameter(torch.randn(2, 3))


def _shared_param_in_two_groups():
    p = _param()
    return [{"params": [p]}, {"params": [p]}]


# name -> (params factory, kwargs, a phrase our message must contain, classes it applies to)
ADAM_LIKE = (ActiveAdamW, ActiveRAdam, ActiveAdaBelief)
ERROR_CASES = {
    "a single tensor": (_param, {}, "iterable of Tensors or dicts", CLASSES),
    "None": (lambda: None, {}, "not iterable", CLASSES),
    "empty list": (lambda: [], {}, "empty parameter list", CLASSES),
    "empty generator": (lambda: iter([]), {}, "empty parameter list", CLASSES),
    "same param in two groups": (_shared_param_in_two_groups, {}, "more than one", CLASSES),
    "group params a set": (lambda: [{"params": {_param()}}], {}, "ordered collection", CLASSES),
    "a non-leaf tensor": (lambda: [_param() * 2], {}, "non-leaf", CLASSES),
    "not a tensor": (lambda: ["weight"], {}, "can only optimize", CLASSES),
    "names missing for some params": (
        lambda: [("w", _param()), _param()], {}, "with/without names", CLASSES),
    "groups with and without names": (
        lambda: [{"params": [_param()]}, {"params": [("w", _param())]}], {},
        "with/without names", CLASSES),
    "negative lr": (lambda: [_param()], {"lr": -0.1}, "Invalid learning rate", CLASSES),
    "lr a string": (lambda: [_param()], {"lr": "0.1"}, "lr", CLASSES),
    "tensor lr of 2 elements": (
        lambda: [_param()], {"lr": torch.tensor([1e-3, 1e-3])}, "1-element", CLASSES),
    "negative weight_decay": (
        lambda: [_param()], {"weight_decay": -1.0}, "weight_decay", CLASSES),
    "beta1 = 1": (lambda: [_param()], {"betas": (1.0, 0.0)}, "index 0: 1.0", ADAM_LIKE),
    "beta2 = 1": (lambda: [_param()], {"betas": (0.9, 1.0)}, "index 1: 1.0", ADAM_LIKE),
    "negative eps": (lambda: [_param()], {"eps": -1e-8}, "epsilon", ADAM_LIKE),
    "negative momentum": (lambda: [_param()], {"momentum": -0.5}, "momentum", [ActiveSGD]),
    "nesterov without momentum": (
        lambda: [_param()], {"momentum": 0.0, "nesterov": True}, "Nesterov", [ActiveSGD]),
    "nesterov with dampening": (
        lambda: [_param()], {"momentum": 0.9, "dampening": 0.5, "nesterov": True}, "Nesterov",
        [ActiveSGD]),
    # accepted by torch, so by us
    "a set of params": (lambda: {_param()}, {}, None, CLASSES),
    "a tuple of params": (lambda: (_param(), _param()), {}, None, CLASSES),
    "a group with no params": (lambda: [{"params": [_param()]}, {"params": []}], {}, None, CLASSES),
}
ERROR_PARAMS = [
    pytest.param(cls, name, id=f"{cls.__name__}-{name}")
    for name, (_, _, _, classes) in ERROR_CASES.items()
    for cls in classes
]


def _outcome(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            make()
        except Exception as error:  # noqa: BLE001 - the type is what is compared
            return error
    return None


@pytest.mark.parametrize("cls,case", ERROR_PARAMS)
def test_construction_errors_match_torch(cls, case):
    make_params, kwargs, message, _ = ERROR_CASES[case]
    twin_kwargs = {"lr": 1e-2, **kwargs}
    expected = _outcome(lambda: TWIN[cls](make_params(), **twin_kwargs))
    got = _outcome(lambda: cls(make_params(), steps_per_epoch=SPE, **twin_kwargs))
    assert type(got) is type(expected), f"torch: {expected!r}, {cls.__name__}: {got!r}"
    if message is not None:
        assert message in str(got), f"unclear message: {got}"


@pytest.mark.parametrize("cls", ADAM_LIKE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad_raises_what_torch_raises(cls, backend):
    errors = []
    for optimizer in (TWIN[cls]([_param()], lr=1e-2), _make(cls, [_param()], backend=backend)):
        p = optimizer.param_groups[0]["params"][0]
        p.grad = torch.ones_like(p).to_sparse()
        with pytest.raises(Exception) as error:
            optimizer.step()
        errors.append(error.value)
    assert type(errors[1]) is type(errors[0])
    assert "sparse" in str(errors[1])


def test_add_param_group_needs_a_dict():
    expected = _outcome(lambda: torch.optim.AdamW([_param()]).add_param_group([_param()]))
    for cls in CLASSES:
        got = _outcome(lambda: _make(cls, [_param()]).add_param_group([_param()]))
        assert type(got) is type(expected)
        assert "dict" in str(got), f"unclear message: {got}"


LOAD_ERROR_CASES = {
    "fewer groups": lambda sd: {**sd, "param_groups": sd["param_groups"][:1]},
    "a group of another size": lambda sd: {**sd, "param_groups": [
        {**sd["param_groups"][0], "params": sd["param_groups"][0]["params"][:1]},
        sd["param_groups"][1]]},
}


@pytest.mark.parametrize("case", LOAD_ERROR_CASES)
@pytest.mark.parametrize("cls", CLASSES)
def test_load_state_dict_errors_match_torch(cls, case):
    errors = []
    for make in (lambda ps: TWIN[cls](ps, lr=LR), lambda ps: _make(cls, ps)):
        params = _fresh_params() + [_param()]
        opt = make([{"params": params[:2]}, {"params": params[2:]}])
        _feed(opt, params, 3)
        errors.append(_outcome(lambda: opt.load_state_dict(
            LOAD_ERROR_CASES[case](copy.deepcopy(opt.state_dict())))))
    assert errors[0] is not None and type(errors[1]) is type(errors[0]), errors


# ---- designed differences from torch, pinned ------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_a_param_twice_in_one_group_raises(cls):
    """torch only warns (and says it will become an error): a param listed twice would be
    stepped twice per step() by the fused backends, racing on its own state."""
    p = _param()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        TWIN[cls]([p, p], lr=1e-2)
    with pytest.raises(ValueError, match="twice|more than once|duplicate"):
        cls([p, p], lr=1e-2, steps_per_epoch=SPE)


@pytest.mark.parametrize("cls", CLASSES)
def test_steps_per_epoch_is_required(cls):
    """The epoch length decides when gains move; no default could be right (None means manual
    end_epoch() calls, which must be asked for)."""
    with pytest.raises(TypeError, match="steps_per_epoch"):
        cls([_param()], lr=1e-2)
    cls([_param()], lr=1e-2, steps_per_epoch=None)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64], ids=str)
def test_non_float_params_are_refused_at_construction(cls, dtype):
    """torch accepts them and fails (integers) or views them as real (complex) at step time; the
    Active kernels are written for real floating point only, and say so up front."""
    TWIN[cls]([torch.zeros(2, dtype=dtype)], lr=1e-2)
    with pytest.raises(TypeError, match="floating-point"):
        cls([torch.zeros(2, dtype=dtype)], lr=1e-2, steps_per_epoch=SPE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_active_sgd_refuses_sparse_grads(backend):
    """torch.optim.SGD steps sparse grads; ActiveSGD keeps a dense epoch sum per element, so a
    sparse grad would be densified every step: it refuses them instead."""
    p = _param()
    opt = _make(ActiveSGD, [p], backend=backend)
    p.grad = torch.ones_like(p).to_sparse()
    with pytest.raises(RuntimeError, match="ActiveSGD does not support sparse gradients"):
        opt.step()


# ---- named parameters (torch >= 2.6: "param_names" in groups and state dicts) --------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))


def _named_run(make, named_saved, named_loaded, rename, steps):
    """Train an optimizer built from (named_)parameters for ``steps`` steps and load its state
    dict into a second one on a copy of the model: (first, its params, second, its params)."""
    model = _model()
    opt = make(model.named_parameters() if named_saved else model.parameters())
    params = list(model.parameters())
    _feed(opt, params, steps)
    saved = copy.deepcopy(opt.state_dict())
    if rename:  # torch ignores names when loading: state goes by position
        for group in saved["param_groups"]:
            group["param_names"] = [f"other.{i}" for i in range(len(group["params"]))]
    copy_model = _model()
    copy_model.load_state_dict(model.state_dict())
    loaded = make(copy_model.named_parameters() if named_loaded else copy_model.parameters())
    loaded.load_state_dict(saved)
    return opt, params, loaded, list(copy_model.parameters())


@pytest.mark.parametrize("cls,backend", CLS_FAST_BACKEND)
def test_named_parameters(cls, backend):
    model = _model()
    opt = _make(cls, model.named_parameters(), backend=backend)
    names = [name for name, _ in model.named_parameters()]
    assert opt.param_groups[0]["param_names"] == names
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters()))
    _feed(opt, list(model.parameters()), 2)
    assert opt.state_dict()["param_groups"][0]["param_names"] == names
    # named param groups
    opt = _make(cls, [{"params": model[0].named_parameters()},
                      {"params": model[1].named_parameters(), "lr": LR / 2}], backend=backend)
    assert [g["param_names"] for g in opt.param_groups] == [["weight", "bias"]] * 2


NAMED_VARIANTS = {
    "named-to-named": (True, True, False),
    "named-to-plain": (True, False, False),
    "plain-to-named": (False, True, False),
    "names-mismatch": (True, True, True),
}
NAMED_PARAMS = [
    pytest.param(cls, backend, *flags, id=f"{variant}-{cls.__name__}-{backend}")
    for variant, flags in NAMED_VARIANTS.items()
    for cls in CLASSES
    for backend in BACKENDS
    # the name bookkeeping is the backends' common code: one variant on the slow one
    if backend != "triton" or variant == "named-to-named"
]


@pytest.mark.parametrize("cls,backend,named_saved,named_loaded,rename", NAMED_PARAMS)
def test_named_state_dict_round_trip_like_torch(cls, backend, named_saved, named_loaded, rename):
    """State loads by position whatever the names; the loaded names, where the state dict has
    them, replace the optimizer's (torch's load_state_dict rules), and training continues."""
    steps = _steps(backend, 6)
    twin = _named_run(lambda p: TWIN[cls](p, lr=LR), named_saved, named_loaded, rename, steps)
    ours = _named_run(lambda p: _make(cls, p, backend=backend), named_saved, named_loaded, rename,
                      steps)
    (_, _, twin_loaded, _), (opt, params, loaded, copy_params) = twin, ours
    expected_names = [g.get("param_names") for g in twin_loaded.state_dict()["param_groups"]]
    assert [g.get("param_names") for g in loaded.state_dict()["param_groups"]] == expected_names
    _feed(opt, params, 3, first=steps)
    _feed(loaded, copy_params, 3, first=steps)
    for p, q in zip(params, copy_params):
        assert torch.equal(p, q)


# ---- param groups given as generators --------------------------------------------------------


@pytest.mark.parametrize("cls,backend", CLS_FAST_BACKEND)
def test_param_groups_given_as_generators_train(cls, backend):
    """A group's params given as a generator, at construction and to add_param_group (after a
    step: the new group joins the running epoch clock), train like the same params in lists."""
    runs = []
    for as_generator in (False, True):
        w, b = _fresh_params()
        wrap = (lambda ps: (p for p in ps)) if as_generator else list
        opt = _make(cls, [{"params": wrap([w])}], backend=backend)
        _feed(opt, [w], 1)
        opt.add_param_group({"params": wrap([b]), "lr": LR / 2})
        _feed(opt, [w, b], _steps(backend, 6) - 1, first=1)
        runs.append((w, b))
    (w, b), (w_gen, b_gen) = runs
    assert not torch.equal(w, _fresh_params()[0]) and not torch.equal(b, _fresh_params()[1])
    assert torch.equal(w_gen, w) and torch.equal(b_gen, b)


@pytest.mark.parametrize("cls,backend", CLS_FAST_BACKEND)
def test_step_with_a_closure(cls, backend):
    """step(closure) runs the closure with grad enabled and returns its loss, as in torch."""
    w, b, x = _regression()
    w_c, b_c = _clone([w, b])
    opt, opt_c = _make(cls, [w, b], backend=backend), _make(cls, [w_c, b_c], backend=backend)

    def closure():
        opt_c.zero_grad()
        loss = _loss(w_c, b_c, x)
        loss.backward()
        return loss

    for _ in range(_steps(backend, 5)):
        opt.zero_grad()
        loss = _loss(w, b, x)
        loss.backward()
        opt.step()
        with torch.no_grad():
            assert opt_c.step(closure).item() == loss.item()
    assert torch.equal(w_c, w) and torch.equal(b_c, b)


# ---- hooks (torch's test_step_*_hook*, test_state_dict_*hook*, test_load_state_dict_*hook*) --


@pytest.mark.parametrize("cls,backend", CLS_BACKEND)
def test_step_hooks_fire_in_order_and_can_be_removed(cls, backend):
    params = _fresh_params()
    opt = _make(cls, params, backend=backend)
    other = torch.optim.SGD([_param()], lr=0.1)
    calls, seen = [], []

    def hook(tag):
        def record(optimizer, args, kwargs):
            calls.append(tag)
            seen.append(params[0].detach().clone() if optimizer is opt else None)
        return record

    handles = [
        register_optimizer_step_pre_hook(hook(0)),
        register_optimizer_step_post_hook(hook(5)),
        opt.register_step_pre_hook(hook(1)),
        opt.register_step_post_hook(hook(2)),
        other.register_step_pre_hook(hook(1)),
        other.register_step_post_hook(hook(2)),
    ]
    try:
        _set_grads(params, 0)
        before = params[0].detach().clone()
        opt.step()
        assert calls == [0, 1, 2, 5]
        # pre hooks see the params before the step, post hooks after it
        assert torch.equal(seen[0], before) and torch.equal(seen[1], before)
        assert torch.equal(seen[2], params[0]) and not torch.equal(seen[2], before)
        other.step()
        assert calls == [0, 1, 2, 5] * 2
    finally:
        for handle in handles:
            handle.remove()
    opt.step()
    other.step()
    assert calls == [0, 1, 2, 5] * 2


@pytest.mark.parametrize("cls,backend", CLS_BACKEND)
def test_step_pre_hook_can_replace_the_arguments(cls, backend):
    params = _fresh_params()
    opt = _make(cls, params, backend=backend)

    def closure():
        _set_grads(params, 0)
        return 3.0

    # torch hands the hook step's positional args, the optimizer first
    opt.register_step_pre_hook(lambda optimizer, args, kwargs: (args, {"closure": closure}))
    assert opt.step() == 3.0
    assert opt.state[params[0]]["step"] == 1


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) is not None
    return state_dict


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_hooks(cls):
    opt = _make(cls, [_param()])
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert opt.state_dict()["state"]["test"] == 1

    opt = _make(cls, [_param()])
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    assert opt.state_dict()["ran_state_dict_pre_hook"] is False

    opt = _make(cls, [_param()])
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = opt.state_dict()
    assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"] is True


def _load_pre_hook_in_place(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook_returning(optimizer, state_dict):
    state_dict = copy.deepcopy(state_dict)
    state_dict["param_groups"][0]["lr"] = 0.003
    return state_dict


def _load_post_hook(optimizer):
    optimizer.state["ran_pre_hook_returning"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_post_hook"] = True


@pytest.mark.parametrize("cls", CLASSES)
def test_load_state_dict_hooks(cls):
    opt = _make(cls, [_param()])
    state_dict = copy.deepcopy(opt.state_dict())
    opt.register_load_state_dict_pre_hook(_load_pre_hook_in_place)
    opt.load_state_dict(copy.deepcopy(state_dict))
    assert opt.param_groups[0]["lr"] == 0.002
    # prepended, the returning hook runs first and the in-place one overrides it
    opt.register_load_state_dict_pre_hook(_load_pre_hook_returning, prepend=True)
    opt.load_state_dict(copy.deepcopy(state_dict))
    assert opt.param_groups[0]["lr"] == 0.002

    opt = _make(cls, [_param()])
    opt.register_load_state_dict_post_hook(_load_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_pre_hook_returning"] is False and opt.state["ran_post_hook"] is True

    opt = _make(cls, [_param()])
    opt.register_load_state_dict_pre_hook(_load_pre_hook_returning)
    opt.register_load_state_dict_post_hook(_load_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_pre_hook_returning"] is True and opt.state["ran_post_hook"] is True


@pytest.mark.parametrize("cls", CLASSES)
def test_state_not_keyed_by_a_param_survives_a_round_trip(cls):
    """torch's load_state_dict copies state entries that belong to no param as they are ("needed
    for backward compatibility"), and hooks keep such entries (torch's own hook tests stash flags
    in ``optimizer.state["test"]``)."""
    params = _fresh_params()
    opt = _make(cls, params)
    _feed(opt, params, 1)
    opt.state["note"] = {"saved_at_epoch": 3}
    state_dict = copy.deepcopy(opt.state_dict())
    twin = TWIN[cls](_clone(params), lr=LR)
    twin_state_dict = twin.state_dict()
    twin_state_dict["state"]["note"] = {"saved_at_epoch": 3}
    twin.load_state_dict(twin_state_dict)
    assert twin.state["note"] == {"saved_at_epoch": 3}  # what torch does
    loaded = _make(cls, _clone(params))
    loaded.load_state_dict(state_dict)
    assert loaded.state["note"] == {"saved_at_epoch": 3}
    _assert_equal_nested(loaded.state_dict(), opt.state_dict())


# ---- step() leaves the grads alone -----------------------------------------------------------


@pytest.mark.parametrize("cls,backend", CLS_BACKEND)
@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
def test_step_never_modifies_grads(cls, backend, maximize):
    # a transposed param and an empty one too (torch tests every optimizer with an empty param)
    params = _fresh_params() + [nn.Parameter(torch.randn(4, 2).t()),
                                nn.Parameter(torch.empty(0, 3))]
    opt = _make(cls, params, backend=backend, maximize=maximize, weight_decay=0.1)
    for t in range(_steps(backend, 6)):  # across epoch boundaries: the gain updates read grads
        _set_grads(params, t)
        before = [p.grad.clone() for p in params]
        opt.step()
        for p, g in zip(params, before):
            assert torch.equal(p.grad, g), f"step {t} changed a grad in place"


# ---- tensor learning rates -------------------------------------------------------------------


TENSOR_LR_PARAMS = [
    pytest.param(cls, backend, shape, id=f"{cls.__name__}-{backend}-{shape}")
    for cls in CLASSES
    for backend in BACKENDS
    for shape in [(), (1,), (1, 1)]
    if backend != "triton" or shape != (1,)  # the slow backend: the 0-dim and the 2-dim lr
]


@pytest.mark.parametrize("cls,backend,shape", TENSOR_LR_PARAMS)
def test_tensor_lr_steps_like_a_float_lr(cls, backend, shape):
    """torch accepts a one-element lr of any shape (test_tensor_lr)."""
    steps = _steps(backend, 6)
    lr = torch.full(shape, LR)
    runs = []
    for group_lr in (LR, lr):
        params = _fresh_params()
        opt = _make(cls, params, backend=backend, lr=group_lr)
        _feed(opt, params, steps)
        runs.append(params)
    for p, q in zip(*runs):
        assert torch.equal(p, q)
    assert torch.equal(lr, torch.full(shape, LR)), "the step changed the lr tensor"


@pytest.mark.parametrize("cls,backend", CLS_BACKEND)
def test_low_precision_tensor_lr_in_a_later_group(cls, backend):
    """torch accepts a bfloat16 lr tensor. Ours may refuse it (with a ValueError at construction,
    or when a step finds one a scheduler or the user put in a group), but a refused step must
    change nothing: not even the groups before the offending one."""
    bf16_lr = torch.tensor(LR, dtype=torch.bfloat16)
    constructed = _outcome(lambda: _make(cls, [_param()], backend=backend, lr=bf16_lr))
    assert constructed is None or isinstance(constructed, ValueError), repr(constructed)
    runs = []
    for lr in (bf16_lr, LR):
        params = _fresh_params()
        opt = _make(cls, [{"params": params[:1]}, {"params": params[1:]}], backend=backend)
        _feed(opt, params, 2)
        opt.param_groups[1]["lr"] = lr
        before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
        try:
            _feed(opt, params, 1, first=2)
        except (RuntimeError, ValueError, TypeError):
            assert all(torch.equal(p, q) for p, q in zip(params, before[0])), \
                "a refused step changed the params of the group before the refused one"
            _assert_equal_nested(opt.state_dict(), before[1])
            return
        runs.append(params)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


# ---- state dicts -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls,backend", CLS_BACKEND)
def test_state_dict_deterministic(cls, backend):
    """torch's test_state_dict_deterministic: a state dict loaded into an optimizer over equal
    (not identical) params continues identically, and both give equal state dicts; loading does
    not modify the state dict given."""
    steps = _steps(backend, 6)
    params = _fresh_params()
    opt = _make(cls, params, backend=backend)
    _feed(opt, params, steps - 1)  # resumed mid-epoch (at a boundary on triton)
    params_c = _clone(params)
    opt_c = _make(cls, params_c, backend=backend)
    state_dict = copy.deepcopy(opt.state_dict())
    opt_c.load_state_dict(state_dict)
    _assert_equal_nested(state_dict, opt.state_dict())
    for t in range(steps - 1, steps + 3):
        _set_grads(params, t)
        _set_grads(params_c, t)
        opt.step()
        opt_c.step()
        for p, q in zip(params, params_c):
            assert torch.equal(p, q), f"step {t}"
    _assert_equal_nested(opt.state_dict(), opt_c.state_dict())


@pytest.mark.parametrize("cls,backend", CLS_BACKEND)
def test_state_dict_moves_between_backends(cls, backend):
    """The CPU analogue of torch's test_state_dict_with_cuda_params: a state dict saved by the
    reference backend loads into another backend without being modified, keeps ``step`` on the
    CPU, and both continue alike (to rounding: the backends order float operations apart)."""
    params = _fresh_params()
    opt = _make(cls, params)
    _feed(opt, params, 3)
    params_b = _clone(params)
    opt_b = _make(cls, params_b, backend=backend)
    saved = copy.deepcopy(opt.state_dict())
    opt_b.load_state_dict(saved)
    _assert_equal_nested(saved, opt.state_dict())
    assert all(opt_b.state[p]["step"].device.type == "cpu" for p in params_b)
    _feed(opt, params, 3, first=3)
    _feed(opt_b, params_b, 3, first=3)
    torch.testing.assert_close(params_b, params)
    for p, q in zip(params, params_b):
        torch.testing.assert_close(opt_b.state[q], opt.state[p])


@pytest.mark.parametrize("cls,backend", CLS_BACKEND)
def test_identical_runs_give_identical_state_dicts(cls, backend):
    state_dicts = []
    for _ in range(2):
        params = _fresh_params()
        opt = _make(cls, params, backend=backend)
        _feed(opt, params, _steps(backend, 6))
        state_dicts.append(opt.state_dict())
    _assert_equal_nested(*state_dicts)
    # and loading a state dict into its own optimizer changes nothing
    opt.load_state_dict(copy.deepcopy(state_dicts[1]))
    _assert_equal_nested(opt.state_dict(), state_dicts[0])


DUPLICATES = {"deepcopy": copy.deepcopy, "pickle": lambda opt: pickle.loads(pickle.dumps(opt))}


@pytest.mark.parametrize("cls,backend,how", [
    pytest.param(cls, backend, how, id=f"{cls.__name__}-{backend}-{how}")
    for cls in CLASSES for backend in BACKENDS for how in DUPLICATES
    if backend != "triton" or how == "deepcopy"  # pickling is deepcopy's __getstate__ again
])
def test_copies_step_identically(cls, backend, how):
    """torch's test_deepcopy_copies_all_public_attrs, and the copy (or unpickled optimizer, as
    torch.save(optimizer) makes) then steps exactly as the original."""
    params = _fresh_params()
    opt = _make(cls, params, backend=backend)
    _feed(opt, params, 3)
    twin = DUPLICATES[how](opt)
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    assert public == {k for k in twin.__dict__ if not k.startswith("_")}
    copied = [p for g in twin.param_groups for p in g["params"]]
    _feed(opt, params, 4, first=3)
    _feed(twin, copied, 4, first=3)
    for p, q in zip(params, copied):
        assert torch.equal(p, q)
    _assert_equal_nested(opt.state_dict(), twin.state_dict())


@pytest.mark.parametrize("cls,backend", CLS_FAST_BACKEND)
def test_state_dict_survives_save_and_weights_only_load(cls, backend):
    model = _model()
    params = list(model.parameters())
    opt = _make(cls, model.named_parameters(), backend=backend)
    _feed(opt, params, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    _assert_equal_nested(torch.load(buffer, weights_only=True), opt.state_dict())


@pytest.mark.parametrize("cls,backend", CLS_BACKEND)
def test_every_per_param_state_value_is_a_tensor(cls, backend):
    """torch's helpers (and FSDP/DCP's optimizer state handling) walk per-param state assuming
    tensors; torch's own optimizers keep only tensors there."""
    params = _fresh_params()
    amsgrad = {"amsgrad": True} if cls in (ActiveAdamW, ActiveAdaBelief) else {}
    opt = _make(cls, params, backend=backend, **amsgrad)
    _feed(opt, params, 3)
    assert all(len(opt.state[p]) > 0 for p in params)  # torch's test_non_empty_state
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            assert isinstance(value, torch.Tensor), f"state[{i}][{key!r}] is {type(value).__name__}"


@pytest.mark.parametrize("cls,backend", CLS_FAST_BACKEND)
def test_loads_a_state_dict_with_a_python_number_step(cls, backend):
    """Older torch versions saved ``step`` as a Python number (torch's test_load_nontensor_step)."""
    runs = []
    for as_number in (False, True):
        params = _fresh_params()
        opt = _make(cls, params, backend=backend)
        _feed(opt, params, 3)
        state_dict = copy.deepcopy(opt.state_dict())
        if as_number:
            for state in state_dict["state"].values():
                state["step"] = state["step"].item()
        opt.load_state_dict(state_dict)
        _feed(opt, params, 3, first=3)
        runs.append((params, opt.state_dict()))
    (p1, sd1), (p2, sd2) = runs
    assert all(torch.equal(p, q) for p, q in zip(p1, p2))
    _assert_equal_nested(sd2, sd1)


# torch's optimizer whose state an Active one takes over, with the settings that make them equal
# while every gain is 1 (ActiveSGD's weight decay is decoupled: none here)
TORCH_BASE = {
    ActiveSGD: lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    ActiveAdamW: lambda params: torch.optim.AdamW(params, lr=1e-2),
    ActiveRAdam: lambda params: torch.optim.RAdam(params, lr=1e-2, weight_decay=1e-2,
                                                  decoupled_weight_decay=True),
}


@pytest.mark.parametrize("cls,backend", [
    pytest.param(cls, backend, id=f"{cls.__name__}-{backend}")
    for cls in TORCH_BASE for backend in BACKENDS
])
def test_loads_its_torch_base_optimizers_state_dict(cls, backend):
    """A torch-format checkpoint of the base optimizer loads (hyperparameters and moments from
    it, gains 1, the epoch clock restarting), so the next two epochs step as torch's would."""
    params = _fresh_params()
    base = TORCH_BASE[cls](params)
    _feed(base, params, 3)
    params_a = _clone(params)
    active = _make(cls, params_a, backend=backend, lr=0.5)
    active.load_state_dict(copy.deepcopy(base.state_dict()))
    assert active.param_groups[0]["lr"] == 1e-2
    _feed(base, params, 2 * SPE, first=3)
    _feed(active, params_a, 2 * SPE, first=3)
    torch.testing.assert_close(params_a, params)
    # torch would load it whatever optimizer saved it; ours checks (designed: test_checkpoint)
    with pytest.raises(ValueError, match="another optimizer"):
        _make(ActiveAdaBelief, _clone(params)).load_state_dict(base.state_dict())


@pytest.mark.parametrize("cls,backend", CLS_FAST_BACKEND)
def test_loads_a_state_dict_saved_with_a_scheduler(cls, backend):
    """torch's schedulers add ``initial_lr`` to every param group; a checkpoint saved with one
    loads into an optimizer that has none yet (the usual resume order: optimizer, then
    scheduler), and the other way round, as in torch."""
    params = _fresh_params()
    opt = _make(cls, params, backend=backend)
    sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for t in range(3):
        _feed(opt, params, 1, first=t)
        sched.step()
    with_initial_lr = copy.deepcopy(opt.state_dict())
    fresh = _make(cls, _clone(params), backend=backend)
    without_initial_lr = copy.deepcopy(fresh.state_dict())
    fresh.load_state_dict(with_initial_lr)
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    opt.load_state_dict(without_initial_lr)  # torch: the loaded groups replace the current ones
    assert "initial_lr" not in opt.param_groups[0]


@pytest.mark.parametrize("cls,backend", CLS_BACKEND)
def test_step_is_a_noop_without_grads_or_with_zero_grads(cls, backend):
    params = _fresh_params()
    start = [p.detach().clone() for p in params]
    opt = _make(cls, params, backend=backend, weight_decay=0.0)
    opt.step()  # no grads
    assert all(torch.equal(p, q) for p, q in zip(params, start))
    for _ in range(_steps(backend, 5)):  # across epoch boundaries: gains shrink, steps stay 0
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, start))


@pytest.mark.parametrize("cls,backend", CLS_BACKEND)
def test_param_groups_lr_and_weight_decay(cls, backend):
    """torch's test_param_groups_lr / test_param_groups_weight_decay: a group with a tiny lr
    stays put while the others train; a group's weight_decay applies to it alone."""
    w, b, x = _regression()
    irrelevant = _param()
    start = irrelevant.detach().clone()
    opt = _make(cls, [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0},
                      {"params": [irrelevant], "lr": 1e-28}], backend=backend, lr=1e-2,
                steps_per_epoch=_training_epoch(cls, {}, SPE))
    initial = _loss(w, b, x).item()
    for _ in range(_steps(backend, 12)):
        opt.zero_grad()
        _loss(w, b, x).backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    assert _loss(w, b, x).item() < initial
    assert torch.equal(irrelevant, start)


GROUP_PARAMS = [
    pytest.param(config, backend, id=f"{config.id}-{backend}")
    for config in CONFIGS
    for backend in BACKENDS
    if backend != "triton" or _triton_subset(config)
]


@pytest.mark.parametrize("config,backend", GROUP_PARAMS)
def test_param_groups_step_like_separate_optimizers(config, backend):
    """TestOptimRenewed's rule: param groups are equivalent to separate optimizers. One group
    takes the config's options, the other the defaults (the epoch clock is shared, and ticks
    alike in separate optimizers stepped together)."""
    params = _fresh_params()
    grouped = config.cls([{"params": params[:1], **config.kwargs}, {"params": params[1:]}],
                         lr=LR, steps_per_epoch=SPE, backend=backend)
    alone = _clone(params)
    separate = [config.cls(alone[:1], lr=LR, steps_per_epoch=SPE, backend=backend,
                           **config.kwargs),
                config.cls(alone[1:], lr=LR, steps_per_epoch=SPE, backend=backend)]
    for t in range(_steps(backend, 7)):
        _set_grads(params, t)
        _set_grads(alone, t)
        grouped.step()
        for opt in separate:
            opt.step()
    for p, q in zip(params, alone):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", CLASSES)
def test_optimizer_can_be_printed(cls):
    text = repr(_make(cls, _fresh_params()))
    assert text.startswith(f"{cls.__name__} (") and "lr: " in text


# ---- the loss goes down: every config on every backend, then under every LR scheduler -------


def _train(opt, w, b, x, steps, maximize, schedule=lambda loss: None):
    """The loss of the last step and the first. With maximize, the optimizer is handed -loss:
    minimizing the loss is the goal either way."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(w, b, x)
        (-loss if maximize else loss).backward()
        opt.step()
        losses.append(loss.item())
        schedule(loss.item())
    return losses[0], _loss(w, b, x).item()


LOSS_PARAMS = [
    pytest.param(config, backend, contiguous, id=f"{config.id}-{backend}-{tag}")
    for config in CONFIGS
    for backend in BACKENDS
    for contiguous, tag in ((True, "contiguous"), (False, "strided"))
    if backend != "triton" or (_triton_subset(config) and contiguous)
]


@pytest.mark.parametrize("config,backend,contiguous", LOSS_PARAMS)
def test_loss_goes_down(config, backend, contiguous):
    """torch's test_forloop_goes_right_direction: 20 steps (7 epochs) of ``|w x + b|^2``."""
    w, b, x = _regression(contiguous=contiguous)
    opt = config.make([w, b], backend=backend, lr=1e-2, steps_per_epoch=3)
    initial, final = _train(opt, w, b, x, _steps(backend, 20), config.kwargs.get("maximize", False))
    assert final < initial


def _has_momentum(opt):
    return opt.defaults.get("momentum", 0) > 0 or "betas" in opt.defaults


def _warm_up_then_greedy(opt, warmup_steps=5):
    """A LinearLR warm-up stepped first, then a GreedyLR (built at the start, on the same
    optimizer) stepped with the loss."""
    warmup = lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warmup_steps)
    greedy = GreedyLR(opt, patience=2)
    count = itertools.count(1)
    return lambda loss: warmup.step() if next(count) <= warmup_steps else greedy.step(loss)


def _stepped_without_the_loss(make):
    def build(opt):
        sched = make(opt)
        return lambda loss: sched.step()
    return build


STEPS = 30
# each builds the schedule on an optimizer and returns what to call after each step with its loss
SCHEDULERS = {
    name: _stepped_without_the_loss(make)
    for name, make in {
        "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=10, gamma=0.5),
        "MultiStepLR": lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[5, 15], gamma=0.5),
        "ConstantLR": lambda opt: lr_scheduler.ConstantLR(opt, factor=0.4, total_iters=4),
        "LinearLR": lambda opt: lr_scheduler.LinearLR(opt, start_factor=0.4, total_iters=4),
        "ExponentialLR": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.95),
        "PolynomialLR": lambda opt: lr_scheduler.PolynomialLR(opt, total_iters=STEPS, power=0.9),
        "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
        "CosineAnnealingWarmRestarts":
            lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10),
        "CyclicLR": lambda opt: lr_scheduler.CyclicLR(
            opt, base_lr=1e-3, max_lr=1e-2, step_size_up=5, cycle_momentum=_has_momentum(opt)),
        "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(
            opt, max_lr=1e-2, total_steps=STEPS + 1, cycle_momentum=_has_momentum(opt)),
        "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda epoch: 0.97**epoch),
        "MultiplicativeLR": lambda opt: lr_scheduler.MultiplicativeLR(opt, lambda epoch: 0.97),
        "SequentialLR": lambda opt: lr_scheduler.SequentialLR(opt, [
            lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=5),
            lr_scheduler.ExponentialLR(opt, gamma=0.95)], milestones=[5]),
        "ChainedScheduler": lambda opt: lr_scheduler.ChainedScheduler([
            lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=5),
            lr_scheduler.ExponentialLR(opt, gamma=0.95)]),
        "SWALR": lambda opt: SWALR(opt, swa_lr=5e-3, anneal_epochs=5),
    }.items()
} | {
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=2).step,
    "GreedyLR": lambda opt: GreedyLR(opt, patience=2).step,
    "LinearLR warm-up, then GreedyLR": _warm_up_then_greedy,
}


SCHEDULER_BACKEND = "cpu" if "cpu" in BACKENDS else "reference"


SCHEDULER_PARAMS = [
    pytest.param(config, name, lr_kind, id=f"{config.id}-{name}-{lr_kind}")
    for config in CONFIGS
    for name in SCHEDULERS
    # a tensor lr (updated in place by every scheduler) for one config of each class
    for lr_kind in (("float", "tensor") if config.kwargs == {} else ("float",))
]


# a scheduler that does not see the optimizer's steps warns (UserWarning) that it is stepped first
@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("config,name,lr_kind", SCHEDULER_PARAMS)
def test_loss_goes_down_under_every_scheduler(config, name, lr_kind):
    """torch's test_forloop_goes_right_direction(with_lrsched) and
    test_param_group_with_lrscheduler_goes_right_direction: two param groups, one with its own
    lr, for 30 steps in epochs of 3 (see _training_epoch)."""
    w, b, x = _regression()
    as_lr = torch.tensor if lr_kind == "tensor" else float
    opt = config.make([{"params": [w]}, {"params": [b], "lr": as_lr(5e-3)}], lr=as_lr(1e-2),
                      steps_per_epoch=_training_epoch(config.cls, config.kwargs, 3),
                      backend=SCHEDULER_BACKEND)
    initial, final = _train(opt, w, b, x, STEPS, config.kwargs.get("maximize", False),
                            SCHEDULERS[name](opt))
    assert final < initial


def test_greedy_lr_moves_a_tensor_lr_shared_by_groups_once():
    """A tensor lr given as the default is shared by every group that sets none; an increase or
    a decrease must scale it once, not once per group."""
    shared = torch.tensor(0.1)
    opt = _make(ActiveAdamW, [{"params": [_param()]}, {"params": [_param()]}], lr=shared)
    assert opt.param_groups[0]["lr"] is opt.param_groups[1]["lr"]
    sched = GreedyLR(opt, patience=0, factor=0.5)
    sched.step(1.0)  # the first metric improves on none: one increase
    assert shared.item() == pytest.approx(0.2)
    sched.step(2.0)  # worse: one decrease
    assert shared.item() == pytest.approx(0.1)
    assert sched.get_last_lr() == [pytest.approx(0.1)] * 2


def test_greedy_lr_built_during_a_warm_up_uses_the_initial_lr():
    """torch's schedulers record each group's ``initial_lr``; GreedyLR built right after a
    warm-up scheduler (which has already scaled the lr down) takes that as its base, so its
    default bounds (initial lr × 1e-3 … × 10) and resets refer to the lr the user chose."""
    params = [_param()]
    opt = _make(ActiveAdamW, params, lr=0.1)
    warmup = lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    greedy = GreedyLR(opt, patience=0, factor=0.5)
    assert greedy.base_lrs == [pytest.approx(0.1)]
    for t in range(3):
        _feed(opt, params, 1, first=t)
        warmup.step()
    for metric in range(10, 0, -1):  # improving every step: the lr rises to its cap
        greedy.step(float(metric))
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
