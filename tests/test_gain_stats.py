"""gain_stats(): per-param gain statistics read from the optimizer state, on every backend."""

import pytest
import torch

from adaptive_lr import Active, ActiveAdamW, ActiveSGD, available_backends

# 6 elements: the first 4 keep their gradient sign every epoch, the last 2 flip it.
SIGNS = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, -1.0])
FLIPS = torch.tensor([False, False, False, False, True, True])


def _epoch_grad(epoch: int) -> torch.Tensor:
    return torch.where(FLIPS, SIGNS * (-1) ** epoch, SIGNS)


def _paper_rule_sgd(backend: str, named_params: list):
    """Plain SGD with the paper's gain rule, one step per epoch: ActiveSGD on ``backend``, or
    Active(torch.optim.SGD) for ``"wrapper"``."""
    if backend == "wrapper":
        return Active(torch.optim.SGD(named_params, lr=1e-3), steps_per_epoch=1,
                      sign_threshold=0.0)
    return ActiveSGD(named_params, lr=1e-3, steps_per_epoch=1, momentum=0.0,
                     sign_threshold=0.0, backend=backend)


@pytest.mark.parametrize("backend", available_backends("cpu") + ["wrapper"])
def test_statistics_and_growth_fractions_per_epoch(backend):
    w = torch.nn.Parameter(torch.zeros(6))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = _paper_rule_sgd(backend, [("w", w), ("b", b)])
    assert opt.gain_stats() == {}  # no state before the first step
    assert len(opt.state) == 0  # and reading it adds none (Active(...) took an empty one for state)
    history = []
    for epoch in range(4):
        w.grad = _epoch_grad(epoch)
        b.grad = None if epoch == 0 else torch.ones(2)  # b's state starts one epoch late
        opt.step()
        history.append(opt.gain_stats(since=history[-1] if history else None))
    # epoch index 2 is the first step with updated gains (persist: 1 + 2, flip: 1 * 0.5)
    assert set(history[0]) == {"w"} and set(history[1]) == {"w", "b"}
    assert "grew" not in history[0]["w"] and "grew" not in history[1]["b"]
    assert history[1]["w"]["grew"] == 0 and history[1]["w"]["shrank"] == 0
    third = history[2]["w"]
    assert (third["numel"], third["median"], third["p99"], third["max"]) == (6, 3.0, 3.0, 3.0)
    assert third["grew"] == pytest.approx(4 / 6) and third["shrank"] == pytest.approx(2 / 6)
    assert torch.equal(third["gain"], torch.where(FLIPS, 0.5, 3.0))  # a copy: kept as it was
    fourth = history[3]["w"]  # gains 5 (persist) and 0.25 (flip); nearest-rank median: 5
    assert (fourth["median"], fourth["max"]) == (5.0, 5.0)
    assert fourth["grew"] == pytest.approx(4 / 6) and fourth["shrank"] == pytest.approx(2 / 6)
    assert history[2]["b"]["max"] == 1.0 and history[3]["b"]["grew"] == 1.0  # its first update
    assert torch.equal(fourth["gain"], opt.state[w]["gain"])


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_growth_fractions_under_the_sign_test_of_sgd(backend):
    """ActiveSGD's default sign test (k = 2, on the epoch's sum of g**2) over epochs of 5 steps:
    the 4 elements of a constant gradient pass it and grow, the 2 whose gradient alternates
    within each epoch (sum 1 of 5 unit steps) are held, neither grown nor shrunk."""
    w = torch.nn.Parameter(torch.zeros(6))
    opt = ActiveSGD([("w", w)], lr=1e-3, steps_per_epoch=5, momentum=0.0, backend=backend)
    history = []
    for step in range(16):  # the 16th step applies the third boundary
        w.grad = torch.where(FLIPS, SIGNS * (-1) ** step, SIGNS)
        opt.step()
        if step % 5 == 0:
            history.append(opt.gain_stats(since=history[-1] if history else None))
    assert "grad_sq_sum" in opt.state[w]
    last = history[-1]["w"]
    assert torch.equal(last["gain"], torch.where(FLIPS, 1.0, 5.0))
    assert last["grew"] == pytest.approx(4 / 6) and last["shrank"] == 0


def test_quantiles_are_nearest_rank_and_names_default_to_group_and_index():
    p = torch.nn.Parameter(torch.zeros(200))
    q = torch.nn.Parameter(torch.zeros(3))
    opt = ActiveAdamW([p, q], steps_per_epoch=1, backend="reference")
    p.grad, q.grad = torch.ones(200), torch.ones(3)
    opt.step()
    opt.state[p]["gain"].copy_(torch.arange(1.0, 201.0))  # ranks 100 and 198 of 1..200
    stats = opt.gain_stats()
    assert set(stats) == {"0.0", "0.1"}
    assert (stats["0.0"]["median"], stats["0.0"]["p99"], stats["0.0"]["max"]) == (100.0, 198.0, 200.0)


def test_a_param_without_elements_has_no_quantiles():
    """nn.Linear(0, 4)'s weight (and an FSDP2 shard can be empty): gain_stats used to raise."""
    empty, q = torch.nn.Parameter(torch.zeros(4, 0)), torch.nn.Parameter(torch.zeros(3))
    opt = ActiveAdamW([empty, q], steps_per_epoch=1, backend="reference")
    empty.grad, q.grad = torch.zeros(4, 0), torch.ones(3)
    opt.step()
    first = opt.gain_stats()
    stats = opt.gain_stats(first)
    assert {k: stats["0.0"][k] for k in ("numel", "median", "p99", "max")} == dict(
        numel=0, median=None, p99=None, max=None)
    assert "grew" not in stats["0.0"] and stats["0.1"]["grew"] == 0.0
