"""The study code: fair optimizer pairs, statistics, spike damage/recovery, and a tiny GreedyLR
study end to end."""

import csv
import json
import math

import pytest
import torch

from adaptive_lr.study import greedy, lr_sweep, runner


def _sweep_run(pair, active, epochs):
    return lr_sweep.train_one(dict(model="mlp", pair=pair, active=active, lr=1e-2, seed=3,
                                   epochs=epochs, batch_size=256, target_accuracy=0.9))


@pytest.mark.parametrize("pair", lr_sweep.PAIRS)
def test_each_pair_is_its_base_until_the_first_gain_update(pair):
    """Gains are 1 for two epochs: a fair pair trains identically until then, then departs."""
    torch.set_num_threads(1)
    base, active = _sweep_run(pair, False, 2), _sweep_run(pair, True, 2)
    assert active["final_train_loss"] == pytest.approx(base["final_train_loss"], rel=1e-5)
    assert active["final_test_accuracy"] == pytest.approx(base["final_test_accuracy"], abs=0.003)
    assert _sweep_run(pair, True, 3)["final_train_loss"] != pytest.approx(
        _sweep_run(pair, False, 3)["final_train_loss"], rel=1e-5)


def test_statistics():
    assert runner.mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert all(math.isnan(v) for v in runner.mean_sd([1.0, math.nan]))
    assert runner.median_iqr([4.0, 1.0, 3.0, 2.0, 5.0]) == (2.0, 3.0, 4.0)
    # a diverged minority moves the upper quartile only
    assert runner.median_iqr([1.0, 2.0, 3.0, math.inf, math.inf]) == (2.0, 3.0, math.inf)
    assert runner.median_iqr([7.0]) == (7.0, 7.0, 7.0)
    assert runner.finite_or_inf(math.nan) == math.inf


def test_strict_json_writes_non_finite_as_null(tmp_path):
    runner.write_json(tmp_path / "x.json", {"a": [1.0, math.nan], "b": {"c": math.inf}})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1.0, None], "b": {"c": None}}


@pytest.mark.parametrize("after,expected", [
    ([50.0, 20.0, 6.0, 4.0, 3.0], (10.0, 4)),  # peak 10x the pre-spike mean, back 4 steps on
    ([4.0, 3.0, 3.0, 3.0, 3.0], (0.8, 0)),  # never rose above the pre-spike mean
    ([9.0, 9.0, 8.0, 7.0, 6.0], (1.8, None)),  # never came back
])
def test_spike_damage_and_recovery(after, expected, monkeypatch):
    monkeypatch.setattr(greedy, "PEAK_WINDOW", 0.2)  # 5 of 25 steps
    losses = [6.0, 4.0] * 10 + after
    ratio, steps = greedy._damage_and_recovery(losses, spike_step=20)
    assert (ratio, steps) == (pytest.approx(expected[0]), expected[1])


@pytest.mark.parametrize("problem", greedy.PROBLEMS)
def test_every_problem_starts_at_its_seed_and_descends(problem):
    task = dict(problem=problem, schedule="constant", lr=1e-2 if problem in greedy.MLPS else 3e-2,
                seed=0, spike=False, analytic_steps=200, mlp_epochs=2)
    first, again = greedy.run_one(task), greedy.run_one(task)
    assert first == again  # the seed fixes start, noise and batches
    assert first["final_loss"] < first["start_loss"]
    other_seed = greedy.run_one({**task, "seed": 1})
    assert other_seed["start_loss"] != first["start_loss"]


def test_spike_reaches_optimizer_and_scheduler():
    task = dict(problem="quadratic-k100", schedule="greedy", lr=3e-2, seed=0,
                analytic_steps=300, mlp_epochs=1, trace=True)
    calm, spiked = greedy.run_one({**task, "spike": False}), greedy.run_one({**task, "spike": True})
    spike = int(greedy.SPIKE_AT * 300)
    assert calm["true_losses"][:spike] == spiked["true_losses"][:spike]  # identical until then
    after = slice(spike, spike + 30)
    assert max(spiked["true_losses"][after]) > 10 * max(calm["true_losses"][after])  # x was kicked
    assert spiked["spike_peak_ratio"] > 10 and calm["spike_peak_ratio"] is None
    assert spiked["lrs"] != calm["lrs"]  # GreedyLR saw the spike


def test_tiny_greedy_study_end_to_end(tmp_path):
    config = greedy.GreedyConfig(
        problems=("quadratic-k100", "digits-mlp"), analytic_lrs=(1e-2, 1e-1), mlp_lrs=(1e-3,),
        analytic_steps=60, mlp_epochs=1, tuning_seeds=(100,), analytic_eval_seeds=2,
        mlp_eval_seeds=1)
    greedy.run(config, str(tmp_path), workers=1)

    with open(tmp_path / "greedy_tuning.csv") as f:
        tuning = list(csv.DictReader(f))
    assert len(tuning) == len(greedy.SCHEDULES) * (2 + 1)
    with open(tmp_path / "greedy_eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(greedy.SCHEDULES) * 2 * (2 + 1)  # both conditions
    for r in rows:
        assert float(r["start_loss"]) > 0 and float(r["final_loss"]) >= 0
        assert (r["recovery_steps"] == "") or int(r["recovery_steps"]) >= 0

    summary = json.loads((tmp_path / "greedy.json").read_text())
    assert len(summary["cells"]) == 2 * len(greedy.SCHEDULES)
    for cell in summary["cells"]:
        grid = config.mlp_lrs if cell["problem"] in greedy.MLPS else config.analytic_lrs
        assert cell["tuned_lr"] in grid
        assert cell["final_loss"][0] <= cell["final_loss"][1] <= cell["final_loss"][2]
    traces = json.loads((tmp_path / "greedy_traces.json").read_text())["traces"]
    assert {(t["problem"], len(t["lrs"])) for t in traces} == {("quadratic-k100", 60),
                                                               ("digits-mlp", 22)}
    assert "| active+greedy max_gain=10 |" in (tmp_path / "greedy.md").read_text()
    for png in ("greedy_final_loss.png", "greedy_spike_traces.png"):
        assert (tmp_path / png).stat().st_size > 10_000
