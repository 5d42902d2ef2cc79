"""The traps an experienced PyTorch user hits first, each pinned by a test: param groups as
generators, named params, resuming with another epoch length, schedulers around GreedyLR,
loading a checkpoint after building a scheduler, duplicate params, state as tensors, and
switching a running torch.optim job to its Active counterpart."""

import copy

import pytest
import torch
from torch.optim.lr_scheduler import LinearLR, SequentialLR

from adaptive_lr import ActiveAdamW, ActiveRAdam, ActiveSGD, GreedyLR, available_backends

BACKENDS = available_backends("cpu")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen))
            for _ in range(steps)]


def _train(model, opt, batches):
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- param groups ---------------------------------------------------------------------------


def test_param_groups_given_as_generators_train_every_param():
    model = _model()
    weights = (p for n, p in model.named_parameters() if n.endswith("weight"))
    biases = (p for n, p in model.named_parameters() if n.endswith("bias"))
    opt = ActiveAdamW([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=1e-2,
                      steps_per_epoch=2)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, _batches(2))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_add_param_group_with_a_generator():
    model = _model()
    first, last = model[0], model[2]
    opt = ActiveSGD(first.parameters(), lr=0.1, steps_per_epoch=2)
    opt.add_param_group({"params": last.parameters()})
    assert len(opt.param_groups[1]["params"]) == 2
    before = last.weight.detach().clone()
    _train(model, opt, _batches(1))
    assert not torch.equal(last.weight, before)


def test_a_param_listed_twice_is_refused():
    """torch only warns and steps such a param twice; the fused kernels would race on it."""
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="lists the same tensor twice"):
        ActiveAdamW([p, p], steps_per_epoch=2)
    opt = ActiveAdamW([torch.zeros(2, requires_grad=True)], steps_per_epoch=2)
    with pytest.raises(ValueError, match="lists the same tensor twice"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


def test_a_set_of_params_is_refused_as_torch_refuses_it():
    with pytest.raises(TypeError, match="not a set"):
        ActiveAdamW([{"params": {torch.zeros(2, requires_grad=True)}}], steps_per_epoch=2)


# ---- named params -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_parameters_train_and_round_trip_their_names(backend):
    model = _model()
    opt = ActiveAdamW(model.named_parameters(), lr=1e-2, steps_per_epoch=2, backend=backend)
    names = [n for n, _ in model.named_parameters()]
    assert opt.param_groups[0]["param_names"] == names
    _train(model, opt, _batches(3))
    saved = opt.state_dict()
    assert saved["param_groups"][0]["param_names"] == names
    resumed_model = copy.deepcopy(model)
    resumed = ActiveAdamW(resumed_model.named_parameters(), lr=1e-2, steps_per_epoch=2,
                          backend=backend)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["param_names"] == names
    assert _train(resumed_model, resumed, _batches(3, seed=2)) == _train(model, opt, _batches(3, seed=2))


def test_a_state_dict_without_names_keeps_the_optimizers_names():
    """As torch: loading never drops names the optimizer has."""
    model = _model()
    unnamed = ActiveAdamW(model.parameters(), steps_per_epoch=2)
    named = ActiveAdamW(model.named_parameters(), steps_per_epoch=2)
    named.load_state_dict(unnamed.state_dict())
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]


# ---- the epoch clock across a resume --------------------------------------------------------


def _trained_sgd(steps_per_epoch, steps):
    """The paper's rule (kept by a resume: the groups hold it), so that gains move in epochs of 4."""
    model = _model()
    opt = ActiveSGD(model.parameters(), lr=0.05, steps_per_epoch=steps_per_epoch,
                    sign_threshold=0.0)
    _train(model, opt, _batches(steps))
    return model, opt


@pytest.mark.parametrize("saved_steps_per_epoch", [8, None], ids=["longer-epoch", "manual-mode"])
def test_a_resume_with_a_shorter_epoch_keeps_the_clock_running(saved_steps_per_epoch):
    """Saved 6 steps into an epoch (of 8, or in manual mode), resumed with 4 steps per epoch (a
    bigger batch): that epoch ends at the next step and the gains keep moving (the clock used to
    stop for good)."""
    model, opt = _trained_sgd(saved_steps_per_epoch, 6)
    assert opt.param_groups[0]["steps_in_epoch"] == 6
    resumed = ActiveSGD(model.parameters(), lr=0.05, steps_per_epoch=4)
    resumed.load_state_dict(opt.state_dict())
    _train(model, resumed, _batches(1, seed=3))
    assert resumed.param_groups[0]["epoch"] == 1 and resumed.param_groups[0]["steps_in_epoch"] == 0
    _train(model, resumed, _batches(9, seed=4))  # epochs 2 and 3 end: the gains move
    assert resumed.param_groups[0]["epoch"] == 3
    gains = torch.cat([resumed.state[p]["gain"].flatten() for p in model.parameters()])
    assert not torch.all(gains == 1)


# ---- state --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_per_param_state_value_is_a_tensor(backend):
    model = _model()
    opt = ActiveAdamW(model.parameters(), steps_per_epoch=2, backend=backend)
    _train(model, opt, _batches(5))
    for state in opt.state.values():
        assert state and all(isinstance(v, torch.Tensor) for v in state.values()), state.keys()
    assert opt.state[model[0].weight]["epoch"].item() == 2


def test_a_state_dict_with_python_number_steps_loads():
    """Older torch versions saved ``step`` as a Python number."""
    model, opt = _trained_sgd(2, 5)
    saved = opt.state_dict()
    for state in saved["state"].values():
        state["step"] = int(state["step"].item())
    resumed = ActiveSGD(copy.deepcopy(model).parameters(), lr=0.05, steps_per_epoch=2)
    resumed.load_state_dict(saved)
    assert all(s["step"].dtype == torch.float32 and s["step"].item() == 5
               for s in resumed.state.values())


def test_a_checkpoint_loads_after_a_scheduler_added_initial_lr():
    """The common order: build optimizer and scheduler, then load the optimizer's checkpoint,
    saved before the scheduler existed (or the other way round). torch loads both."""
    model, opt = _trained_sgd(2, 3)
    saved_without = opt.state_dict()
    resumed = ActiveSGD(model.parameters(), lr=0.05, steps_per_epoch=2)
    LinearLR(resumed, start_factor=0.5, total_iters=4)
    resumed.load_state_dict(saved_without)
    assert resumed.param_groups[0]["epoch"] == opt.param_groups[0]["epoch"]
    LinearLR(opt, start_factor=0.5, total_iters=4)
    fresh = ActiveSGD(model.parameters(), lr=0.05, steps_per_epoch=2)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["initial_lr"] == 0.05


# ---- GreedyLR with other schedulers and shared tensor lrs ---------------------------------


def test_greedy_lr_changes_a_tensor_lr_shared_by_groups_once():
    lr = torch.tensor(0.01, dtype=torch.float64)
    params = [torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    opt = ActiveAdamW([{"params": params[:1], "lr": lr}, {"params": params[1:], "lr": lr}],
                      steps_per_epoch=2)
    sched = GreedyLR(opt, factor=0.5, patience=0)
    sched.step(1.0)  # the first metric improves on nothing seen: one increase
    assert lr.item() == pytest.approx(0.02)
    sched.step(1.0)  # no improvement: one decrease
    assert lr.item() == pytest.approx(0.01)


def test_greedy_lr_after_a_warm_up_takes_the_configured_lr_as_its_base():
    model = _model()
    opt = ActiveAdamW(model.parameters(), lr=1e-2, steps_per_epoch=4)
    warmup = LinearLR(opt, start_factor=0.1, total_iters=5)
    sched = GreedyLR(opt, factor=0.5, patience=0)
    assert sched.base_lrs == [1e-2] and sched.max_lrs == [pytest.approx(0.1)]
    for _ in range(5):
        warmup.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    sched.step(1.0)  # improves: the lr rises (it used to fall to the warm-up's max of 1e-2 / 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-2)


def test_greedy_lr_never_lowers_an_lr_above_max_lr_on_an_improvement():
    p = torch.zeros(2, requires_grad=True)
    opt = ActiveSGD([p], lr=1.0, steps_per_epoch=2)
    sched = GreedyLR(opt, factor=0.5, patience=0, max_lr=2.0)
    opt.param_groups[0]["lr"] = 5.0  # set by hand above max_lr
    sched.step(1.0)
    assert opt.param_groups[0]["lr"] == 5.0


def test_sequential_lr_refuses_greedy_lr_when_it_is_built():
    """It cannot pass a metric to GreedyLR.step(): refused at construction, not at the milestone
    with a bare NotImplementedError."""
    opt = ActiveAdamW([torch.zeros(2, requires_grad=True)], steps_per_epoch=2)
    warmup = LinearLR(opt, start_factor=0.1, total_iters=3)
    with pytest.raises(ValueError, match="requires additional kwargs"):
        SequentialLR(opt, [warmup, GreedyLR(opt)], milestones=[3])


# ---- switching a running torch.optim job to ActiveLR -------------------------------------


def _torch_and_active(torch_cls, active_cls, torch_kwargs, active_kwargs=None, steps=4):
    """A torch.optim run for ``steps`` steps, then two copies continued: one with torch, one
    switched to its Active counterpart through from_optimizer."""
    model = _model()
    torch_opt = torch_cls(model.parameters(), **torch_kwargs)
    _train(model, torch_opt, _batches(steps))
    active_model = copy.deepcopy(model)
    active_torch_opt = torch_cls(active_model.parameters(), **torch_kwargs)
    active_torch_opt.load_state_dict(torch_opt.state_dict())
    active = active_cls.from_optimizer(active_torch_opt, steps_per_epoch=3,
                                       **(active_kwargs or {}))
    return model, torch_opt, active_model, active


@pytest.mark.parametrize("torch_cls,active_cls,kwargs", [
    (torch.optim.AdamW, ActiveAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (torch.optim.SGD, ActiveSGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.RAdam, ActiveRAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
], ids=["AdamW", "SGD", "RAdam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_switched_job_continues_as_its_torch_optimizer_for_two_epochs(
        torch_cls, active_cls, kwargs, backend):
    # the paper's rule, so that the first comparison moves gains: in epochs of 3 steps the
    # default sign test (k = 2: a constant gradient needs more than 4 steps) holds them all
    paper_rule = {"sign_threshold": 0.0}
    model, torch_opt, active_model, active = _torch_and_active(
        torch_cls, active_cls, kwargs, dict(backend=backend, **paper_rule))
    for key in set(kwargs) & set(active.defaults):
        assert active.param_groups[0][key] == kwargs[key], key
    assert active.param_groups[0]["epoch"] == 0
    batches = _batches(6, seed=5)  # two epochs of 3 steps: every gain is still 1
    torch_losses, active_losses = _train(model, torch_opt, batches), _train(active_model, active, batches)
    torch.testing.assert_close(active_losses, torch_losses, rtol=1e-5, atol=1e-6)
    for p, q in zip(active_model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    _train(active_model, active, _batches(1, seed=6))  # the first sign comparison
    gains = torch.cat([active.state[p]["gain"].flatten() for p in active_model.parameters()])
    assert not torch.all(gains == 1)


def test_a_torch_state_dict_loads_and_keeps_names_and_gain_arguments():
    model = _model()
    torch_opt = torch.optim.AdamW(model.named_parameters(), lr=3e-3)
    _train(model, torch_opt, _batches(2))
    active = ActiveAdamW(model.named_parameters(), steps_per_epoch=2, gain_inc=0.5, max_gain=4.0)
    active.load_state_dict(torch_opt.state_dict())
    group = active.param_groups[0]
    assert group["lr"] == 3e-3 and group["gain_inc"] == 0.5 and group["max_gain"] == 4.0
    assert "foreach" not in group and "fused" not in group
    assert group["param_names"] == [n for n, _ in model.named_parameters()]
    state = active.state[model[0].weight]
    assert state["step"].item() == 2 and torch.equal(state["gain"], torch.ones_like(state["gain"]))
    assert torch.equal(state["exp_avg"], torch_opt.state[model[0].weight]["exp_avg"])


def test_an_l2_weight_decay_checkpoint_warns_that_it_now_decouples():
    model = _model()
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    _train(model, torch_opt, _batches(1))
    with pytest.warns(UserWarning, match="was an L2 term of the gradient; in ActiveSGD it is decoupled"):
        ActiveSGD.from_optimizer(torch_opt, steps_per_epoch=2)


def test_the_wrong_torch_optimizer_is_refused_and_changes_nothing():
    model = _model()
    torch_opt = torch.optim.RAdam(model.parameters())
    _train(model, torch_opt, _batches(1))
    active = ActiveAdamW(model.parameters(), steps_per_epoch=2)
    _train(model, active, _batches(1))
    before = copy.deepcopy(active.state_dict())
    with pytest.raises(ValueError, match="neither an ActiveAdamW nor a torch.optim.AdamW"):
        active.load_state_dict(torch_opt.state_dict())
    after = active.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i]["exp_avg"], s["exp_avg"])
               for i, s in before["state"].items())


def test_active_sgd_differs_from_torch_sgd_by_design_in_its_momentum_default():
    """ActiveLR's SGD is SGD with momentum (the paper's): momentum defaults to 0.9, where
    torch.optim.SGD's defaults to 0. The docstring says so."""
    opt = ActiveSGD([torch.zeros(2, requires_grad=True)], lr=0.1, steps_per_epoch=2)
    assert opt.defaults["momentum"] == 0.9
    assert torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1).defaults["momentum"] == 0
    assert "0.9 by default, unlike ``torch.optim.SGD`` (0)" in ActiveSGD.__doc__


@pytest.mark.parametrize("backend", ["auto", "reference", "foreach", "cpu"])
@pytest.mark.parametrize("cls", [ActiveAdamW, ActiveSGD])
def test_params_on_the_meta_device_step_as_torchs_do(cls, backend):
    """A model built on the meta device (shapes only): torch's optimizers step it, creating
    their state; so do the Active ones, on any backend (they raised NotImplementedError)."""
    p = torch.nn.Parameter(torch.empty(3, 4, device="meta"))
    p.grad = torch.empty(3, 4, device="meta")
    opt = cls([p], lr=1e-3, steps_per_epoch=2, backend=backend)
    for _ in range(5):  # two boundaries
        opt.step()
    state = opt.state[p]
    assert state["gain"].device.type == "meta" and state["gain"].shape == (3, 4)
    assert state["momentum_buffer" if cls is ActiveSGD else "exp_avg_sq"].shape == (3, 4)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_a_tensor_lr_that_requires_grad_steps_without_warnings(backend, recwarn):
    """Its value is read detached, by the step and by GreedyLR (both warned from inside)."""
    p = torch.nn.Parameter(torch.zeros(3))
    lr = torch.tensor(0.01, requires_grad=True)
    opt = ActiveAdamW([p], lr=lr, steps_per_epoch=2, backend=backend)
    sched = GreedyLR(opt, patience=0)
    for loss in (1.0, 0.5, 0.25):
        p.grad = torch.ones(3)
        opt.step()
        sched.step(loss)
    assert lr.item() > 0.01 and (p < 0).all()  # GreedyLR raised it in place; the params moved
    assert not [w for w in recwarn.list if "requires_grad" in str(w.message)]
