"""The study code: fair optimizer pairs, statistics, spike damage/recovery, and a tiny GreedyLR
study end to end."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from adaptive_lr.cli import main
from adaptive_lr.study import compact, greedy, lr_sweep, runner


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


# ------------------------------------------------------------------ failed and interrupted runs

def _square(task: dict) -> dict:
    """A fake run (module level: worker processes import it) that fails for task 2."""
    if task["i"] == 2:
        raise ValueError("task 2 is broken")
    return {"i": task["i"], "square": task["i"] ** 2}


def _journal(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_run_is_recorded_and_the_others_kept(workers, tmp_path):
    tasks = [{"i": i} for i in range(5)]
    journal = tmp_path / "runs.jsonl"
    outcome = runner.run_tasks(_square, tasks, workers, "fake", str(journal))
    assert outcome.rows == [{"i": i, "square": i * i} for i in (0, 1, 3, 4)]
    assert outcome.status() == dict(finished=4, total=5, failed=1, interrupted=False)
    records = sorted(_journal(journal), key=lambda r: r["task"]["i"])
    assert [r["task"] for r in records] == tasks
    assert "ValueError: task 2 is broken" in records[2]["error"]
    assert [r["result"] for r in records[:2] + records[3:]] == outcome.rows

    # run again: only the failed run is run again
    ran = []
    again = runner.run_tasks(lambda task: ran.append(task) or {"i": task["i"], "square": 4},
                             tasks, 1, "fake", str(journal))
    assert ran == [{"i": 2}]
    assert again.status() == dict(finished=5, total=5, failed=0, interrupted=False)
    assert [r["square"] for r in again.rows] == [0, 1, 4, 9, 16]


def test_ctrl_c_keeps_the_finished_runs(tmp_path):
    def interrupted_at_3(task):
        if task["i"] == 3:
            raise KeyboardInterrupt
        return {"i": task["i"]}

    journal = tmp_path / "runs.jsonl"
    outcome = runner.run_tasks(interrupted_at_3, [{"i": i} for i in range(6)], 1, "fake",
                               str(journal))
    assert outcome.status() == dict(finished=3, total=6, failed=0, interrupted=True)
    assert [r["result"] for r in _journal(journal)] == [{"i": 0}, {"i": 1}, {"i": 2}]


def slow_sweep_run(task: dict) -> dict:
    """A fake lr-sweep run: seed 0 finishes at once, seed 1 runs until it is ended (it writes
    its process id into $SLOW_RUN_PIDS first)."""
    if task["seed"] == 1:
        with open(os.path.join(os.environ["SLOW_RUN_PIDS"], str(os.getpid())), "w"):
            pass
        time.sleep(3600)
    return {"model": task["model"], "optimizer": lr_sweep.optimizer_name(task["pair"],
                                                                         task["active"]),
            "lr": task["lr"], "seed": task["seed"], "final_train_loss": 0.5,
            "final_test_accuracy": 0.8, "best_test_accuracy": 0.9, "epochs_to_target": 1}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_stops_a_sweep_at_once_and_writes_what_finished(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while both workers
    are busy: the sweep ends, the workers are gone, the four finished runs are written."""
    out, pids = tmp_path / "out", tmp_path / "pids"
    pids.mkdir()
    # a Python started from a terminal has Ctrl-C's handler; one started by a shell's `cmd &`
    # inherits SIGINT ignored (then a sweep rightly ignores it), so the child sets its own
    code = ("import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "import test_study\nfrom adaptive_lr.study import lr_sweep\n"
            "lr_sweep.train_one = test_study.slow_sweep_run\n"
            "from adaptive_lr.cli import main\n"
            "main(['sweep', '--study', 'lr', '--models', 'mlp', '--optimizers', 'SGD', '--lrs', "
            f"'1e-3', '1e-2', '--seeds', '2', '--epochs', '1', '--workers', '2', '--out', "
            f"{str(out)!r}])\n")
    sweep = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "SLOW_RUN_PIDS": str(pids)})
    try:
        # 8 runs: the 4 of seed 0 finish, then both workers are busy with seed 1
        journal = out / "lr_sweep_runs.jsonl"
        while not (journal.exists() and len(journal.read_text().splitlines()) == 4
                   and len(os.listdir(pids)) == 2):
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(0.2)
        os.killpg(sweep.pid, signal.SIGINT)
        stdout, stderr = sweep.communicate(timeout=120)  # a hang here is the failure
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "lr sweep: 4 of 8 runs finished (interrupted)" in stderr
    for pid in map(int, os.listdir(pids)):  # the workers were ended, not left running
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid)
    with open(out / "lr_sweep.csv") as f:
        assert sorted(int(r["seed"]) for r in csv.DictReader(f)) == [0, 0, 0, 0]
    summary = json.loads((out / "lr_sweep.json").read_text())
    assert summary["runs"] == {"lr sweep": dict(finished=4, total=8, failed=0, interrupted=True)}
    markdown = (out / "lr_sweep.md").read_text()
    assert markdown.startswith("**PARTIAL RESULTS: lr sweep: 4 of 8 runs finished (interrupted)")
    assert "PARTIAL RESULTS" in stdout


def test_a_failing_sweep_run_fails_the_command_after_the_others(tmp_path, monkeypatch, capsys):
    def fails_at_lr_1e2(task):
        if task["lr"] == 1e-2 and task["active"]:
            raise RuntimeError("diverged badly")
        return slow_sweep_run(task)

    monkeypatch.setattr(lr_sweep, "train_one", fails_at_lr_1e2)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--study", "lr", "--models", "mlp", "--optimizers", "SGD", "--lrs", "1e-3",
              "1e-2", "--seeds", "1", "--epochs", "1", "--workers", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "lr sweep: 3 of 4 runs finished (1 failed)" in capsys.readouterr().err
    with open(tmp_path / "lr_sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    cells = json.loads((tmp_path / "lr_sweep.json").read_text())["cells"]
    assert [c["runs"] for c in cells] == [1, 1, 1, 0]  # ActiveSGD at 1e-2 has none
    assert "| ActiveSGD | 80.0 ± 0.0 | no run |" in (tmp_path / "lr_sweep.md").read_text()


def test_greedy_study_interrupted_while_tuning_evaluates_nothing(tmp_path, monkeypatch):
    config = greedy.GreedyConfig(
        problems=("quadratic-k100",), schedules=("constant", "greedy"), analytic_lrs=(1e-2, 1e-1),
        analytic_steps=60, tuning_seeds=(100,), analytic_eval_seeds=2)
    run_one = greedy.run_one

    def interrupted_at_the_third(task):
        if (task["schedule"], task["lr"]) == ("greedy", 1e-2):
            raise KeyboardInterrupt
        return run_one(task)

    monkeypatch.setattr(greedy, "run_one", interrupted_at_the_third)
    summary = greedy.run(config, str(tmp_path), workers=1)
    assert summary["runs"] == {
        "GreedyLR study: tuning": dict(finished=2, total=4, failed=0, interrupted=True),
        "GreedyLR study: evaluation": dict(finished=0, total=4, failed=0, interrupted=True)}
    assert not (tmp_path / "greedy_eval_runs.jsonl").exists()
    with open(tmp_path / "greedy_tuning.csv") as f:
        assert [r["schedule"] for r in csv.DictReader(f)] == ["constant", "constant"]
    markdown = (tmp_path / "greedy.md").read_text()
    assert markdown.startswith("**PARTIAL RESULTS: GreedyLR study: tuning: 2 of 4 runs finished")
    assert "| greedy | no tuning run finished |" in markdown


def test_tiny_compact_study_end_to_end(tmp_path):
    """Both precisions train from the same start; full state's float32 sums have float64's signs;
    the summary and the table say which cells are within seed noise."""
    config = compact.CompactConfig(models=("mlp",), pairs=lr_sweep.STUDY_PAIRS[:1], lrs=(1e-2,),
                                   seeds=2, epochs=1)
    summary = compact.run(config, str(tmp_path), workers=1)
    assert summary["cells_total"] == 1
    cell = summary["cells"][0]
    assert cell["within_noise"] == (abs(cell["difference"]) <= cell["noise"])
    assert cell["full"][0] > 0.5 and cell["compact"][0] > 0.5  # one epoch trains the MLP
    full, small = summary["agreement"]["full"]["trained"], summary["agreement"]["compact"]["trained"]
    assert full["runs"] == small["runs"] == 2
    assert full["worst_epoch"] > 0.99999 and 0.999 <= small["worst_epoch"] <= 1.0
    # bfloat16 sums lose the signs of some sums near zero: the compact runs did keep compact state
    assert small["elements_mean"] < full["elements_mean"]
    table = (tmp_path / "compact.md").read_text()
    assert "| mlp | ActiveSGD | 0.01 |" in table and "Cells outside seed noise:" in table
    assert len((tmp_path / "compact_runs.jsonl").read_text().splitlines()) == 4


def test_compact_summary_flags_a_difference_beyond_seed_noise():
    config = compact.CompactConfig(models=("mlp",), pairs=lr_sweep.STUDY_PAIRS[:1], lrs=(1e-2,),
                                   seeds=2)
    name = lr_sweep.optimizer_name(lr_sweep.STUDY_PAIRS[0], True)

    def row(precision, accuracy):
        return {"model": "mlp", "optimizer": name, "lr": 1e-2, "state_precision": precision,
                "final_test_accuracy": accuracy, "final_train_loss": 0.1, "sign_agreement": 1.0,
                "sign_agreement_worst_epoch": 1.0, "sign_agreement_elements": 1.0}

    close = compact.summarize([row("full", 0.90), row("full", 0.92), row("compact", 0.91),
                               row("compact", 0.93)], config)
    apart = compact.summarize([row("full", 0.90), row("full", 0.91), row("compact", 0.80),
                               row("compact", 0.81)], config)
    assert close["cells_outside_noise"] == 0 and apart["cells_outside_noise"] == 1
    assert apart["largest_difference"]["difference"] == pytest.approx(-0.10)
