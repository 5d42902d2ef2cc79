"""The gain-rule study (adaptive_lr/study/robustness.py, docs/RESULTS.md §3): criteria D and K
and the selection rule on hand-made results, the held-out tasks, and a tiny study end to end
(resumed from its journal)."""

import csv
import dataclasses
import json

import pytest
import torch

from adaptive_lr.cli import main
from adaptive_lr.study import robustness
from adaptive_lr.study.digits import load_digits, r2_score, train


@pytest.fixture(autouse=True)
def _foreach_backend(monkeypatch):
    # the fused cpu backend would compile itself first in a checkout without the extension
    monkeypatch.setenv("ADAPTIVE_LR_BACKEND", "foreach")
    torch.set_num_threads(1)


# final accuracy by (pair, candidate) -> one value per lr of LRS
LRS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-1)
ACCURACY = {
    ("AdamW", "base"): (0.10, 0.20, 0.50, 0.97, 0.60),
    ("AdamW", "paper"): (0.115, 0.90, 0.90, 0.95, 0.10),
    ("AdamW", "k=2"): (0.10, 0.76, 0.86, 0.965, 0.595),
    ("AdamW", "max_gain=10"): (0.10, 0.85, 0.90, 0.95, 0.61),
    ("SGD", "base"): (0.10, 0.10, 0.30, 0.90, 0.95),
    ("SGD", "paper"): (0.30, 0.80, 0.90, 0.96, 0.40),
}


def _rows() -> list[dict]:
    """Two seeds per cell, 1 point above and below the value of ACCURACY (the mean)."""
    return [dict(task="mlp", pair=pair, candidate=candidate, lr=lr, seed=seed, batch_size=64,
                 final_test_accuracy=value + (0.01 if seed == 0 else -0.01))
            for (pair, candidate), values in ACCURACY.items() for lr, value in zip(LRS, values)
            for seed in (0, 1)]


def _entry(table, family, candidate):
    (entry,) = [r for r in table if r["family"] == family and r["candidate"] == candidate]
    return entry


def test_criteria_d_and_k_on_hand_made_results():
    table = robustness.criteria_tables(_rows(), ("mlp",), ("SGD", "AdamW"),
                                       ["base", "paper", "max_gain=10", "k=2"], LRS)
    paper = _entry(table, "Adam family", "paper")
    # D over the cells where the base reaches 50 %: lr 1e-4, 1e-3, 1e-1
    assert paper["d_cells"] == 3 and paper["failing_d"] == 2  # -2 and -50 points
    assert paper["worst_d"] == pytest.approx(-50.0)
    assert paper["worst_d_cell"] == ["mlp", "AdamW", 0.1]
    assert [c[:3] for c in paper["failing_d_cells"]] == [["mlp", "AdamW", 1e-3],
                                                         ["mlp", "AdamW", 0.1]]
    assert paper["failing_d_cells"][0][3] == pytest.approx(-2.0)
    # K over lr <= 1e-4 where the paper rule gains > 2 points: 1e-5 and 1e-4, not 1e-6 (1.5)
    assert paper["k_cells"] == 2 and paper["pooled_k"] == pytest.approx(1.0)

    k2 = _entry(table, "Adam family", "k=2")
    assert k2["worst_d"] == pytest.approx(-0.5) and k2["failing_d"] == 0
    assert k2["worst_d_cell"] in (["mlp", "AdamW", 1e-3], ["mlp", "AdamW", 0.1])
    assert k2["pooled_k"] == pytest.approx((0.56 + 0.36) / (0.70 + 0.40))
    assert k2["worst_k"] == pytest.approx(0.8) and k2["worst_k_cell"] == ["mlp", "AdamW", 1e-5]

    capped = _entry(table, "Adam family", "max_gain=10")
    assert capped["worst_d"] == pytest.approx(-2.0) and capped["failing_d"] == 1
    assert capped["pooled_k"] == pytest.approx((0.65 + 0.40) / 1.10)

    # the second moment's sign test (k=...) is the Adam family's: SGD's rows are base and paper
    # (the only SGD results here)
    assert {r["candidate"] for r in table if r["family"] == "SGD"} == {"base", "paper"}
    sgd = _entry(table, "SGD", "paper")
    assert sgd["d_cells"] == 2 and sgd["worst_d"] == pytest.approx(-55.0)
    assert sgd["k_cells"] == 3  # lr 1e-6 too: 20 points

    # k=2 keeps exactly 80 % in its worst cell and more pooled: eligible, and the best worst D
    assert robustness.select(table) == {"SGD": ["paper"],
                                        "Adam family": ["k=2", "max_gain=10", "paper"]}


def test_selection_excludes_a_lost_rescue_and_breaks_ties_by_k():
    def result(name, worst_d, pooled_k):
        return dict(candidate=name, worst_d=worst_d, pooled_k=pooled_k)

    ranked = robustness.rank([
        result("base", 0.0, 0.0),  # never a candidate
        result("paper", -40.0, 1.0),
        result("gain_inc=0.5", 0.5, 0.15),  # no loss, but the rescue is gone
        result("k=1", -0.72, 0.95),
        result("k=3", -0.68, 0.85),  # the same worst D to 0.1 point as k=1: K decides
        result("k=2", -0.9, 0.99),
    ])
    assert ranked == ["k=1", "k=3", "k=2", "paper"]


def test_a_missing_cell_is_left_out_not_counted_as_zero():
    rows = [r for r in _rows() if not (r["candidate"] == "k=2" and r["lr"] == 0.1)]
    table = robustness.criteria_tables(rows, ("mlp",), ("AdamW",), ["base", "paper", "k=2"], LRS)
    assert _entry(table, "Adam family", "k=2")["d_cells"] == 2


def _anchor_rows(anchor: str, values: dict[int, float]) -> list[dict]:
    """One seed per point: exponent j -> the final accuracy at the anchor's default lr × 10^j."""
    return [dict(task="mlp", pair=anchor, candidate="anchor", lr=robustness.anchor_lr(anchor, j),
                 seed=0, batch_size=64, final_test_accuracy=value) for j, value in values.items()]


def test_tuned_lr_and_anchor_table():
    rows = _rows() + _anchor_rows("Prodigy", {-1: 0.965, 0: 0.965, 1: 0.3})
    assert robustness.tuned_lr(rows, "mlp", "AdamW", LRS) == 1e-3
    config = robustness.RulesConfig(lrs=LRS, anchors=("Prodigy",), anchor_exponents=(-1, 0, 1))
    table = robustness.anchors_table(rows, ("mlp",), config, {"Adam family": ["k=2", "paper"]})
    by_method = {r["method"]: r for r in table}
    assert {r["pair"] for r in table} == {"AdamW"}  # the only pair of the config Prodigy anchors
    assert by_method["AdamW"]["tuned_base"] == pytest.approx(97.0)
    assert by_method["ActiveAdamW paper"]["within_1_point"] == 0  # its best, 95 %, is 2 below
    assert by_method["ActiveAdamW k=2"]["within_1_point"] == 1  # 96.5 %
    assert by_method["Prodigy"]["within_1_point"] == 2
    assert by_method["Prodigy"]["worst"] == pytest.approx(30.0)
    assert by_method["Prodigy"]["worst_lr"] == pytest.approx(10.0)


def test_anchor_table_of_the_sgd_pair():
    rows = (_rows() + _anchor_rows("DoG", {-1: 0.2, 0: 0.945, 1: 0.96})
            + _anchor_rows("DAdaptSGD", {-1: 0.945, 1: 0.1})  # its default lr did not run
            + _anchor_rows("Prodigy", {0: 0.9}))
    config = robustness.RulesConfig(lrs=LRS, pairs=("SGD", "Lion"),
                                    anchor_exponents=(-1, 0, 1))
    assert [m[0] for m in robustness.anchor_methods(config, {})["Lion"]] == [
        "Lion", "ActiveLion paper", "Prodigy"]
    table = robustness.anchors_table(rows, ("mlp",), config, {"SGD": ["paper"]})
    # Lion has no base runs here: no row; SGD's tuned base is 95 % (lr 0.1)
    assert [(r["pair"], r["method"]) for r in table] == [
        ("SGD", "SGD"), ("SGD", "ActiveSGD paper"), ("SGD", "DoG"), ("SGD", "DAdaptSGD")]
    sgd, paper, dog, dadapt = table
    assert sgd["tuned_base"] == pytest.approx(95.0) and sgd["within_1_point"] == 1
    assert sgd["worst"] == pytest.approx(10.0) and sgd["worst_lr"] == 1e-6
    assert paper["within_1_point"] == 1 and paper["best"] == pytest.approx(96.0)
    assert (dog["worst"], dog["worst_lr"], dog["within_1_point"], dog["grid_points"]) == (
        pytest.approx(20.0), pytest.approx(0.1), 2, 3)
    # the worst lr of a grid with a missing point is that of the worst value
    assert (dadapt["worst_lr"], dadapt["within_1_point"], dadapt["grid_points"]) == (
        pytest.approx(10.0), 1, 2)
    summary = dict(config=dataclasses.asdict(config), runs={}, backends=[],
                   anchors=dict(table=table))
    text = robustness.markdown(summary)
    assert "DoG: 1 × 10^j; DAdaptSGD: 1 × 10^j; j = -1, 0, 1" in text
    assert "| mlp | SGD | DoG | 20.0 (lr 0.1) | 96.0 | 95.0 | 2 of 3 |" in text


def test_anchor_runs_are_keyed_by_the_anchor_and_run_once():
    config = robustness.RulesConfig(selection_tasks=("mlp",), heldout_tasks=(), seeds=1,
                                    pairs=("SGD", "Lion", "AdamW"), anchor_exponents=(0,))
    assert [t["pair"] for t in robustness.anchor_tasks(config)] == [
        "DoG", "DAdaptSGD", "Prodigy", "SF-AdamW"]
    # the key of the runs journaled before SGD's and Lion's anchors existed
    assert robustness.anchor_tasks(dataclasses.replace(config, pairs=("AdamW",)))[0] == dict(
        task="mlp", pair="Prodigy", candidate="anchor", lr=1.0, seed=0, epochs=40, batch_size=64)
    assert robustness.anchor_tasks(dataclasses.replace(config, pairs=("RAdam",))) == []


@pytest.mark.parametrize("anchor", ["DoG", "DAdaptSGD"])
def test_sgd_anchors_learn_at_their_default_lr(anchor):
    # DoG's first steps are tiny by design (reps_rel): it needs ~100 steps before it learns
    row = robustness.run_one(dict(task="mlp", pair=anchor, candidate="anchor", lr=1.0, seed=0,
                                  epochs=8, batch_size=64))
    assert row["final_test_accuracy"] > 0.8 and row["final_train_loss"] < row["train_loss"][0]
    assert row["gains"] == {} and row["backend"] == ""


def test_a_diverged_dog_run_ends_at_chance_instead_of_failing():
    row = robustness.run_one(dict(task="mlp", pair="DoG", candidate="anchor", lr=1000.0, seed=0,
                                  epochs=2, batch_size=64))
    assert row["final_test_accuracy"] < 0.2 and row["final_train_loss"] != row["final_train_loss"]


@pytest.mark.parametrize("task", robustness.HELDOUT_TASKS)
def test_heldout_tasks_run_and_record_gains(task):
    row = robustness.run_one(dict(task=task, pair="AdamW", candidate="paper", lr=1e-2, seed=0,
                                  epochs=2, batch_size=256))
    assert row["backend"] == "foreach"
    assert 0 <= row["final_test_accuracy"] <= 1 and len(row["test_accuracy"]) == 2
    assert row["final_train_loss"] < row["train_loss"][0]  # it learns
    names = {name for name, _ in (robustness.TASKS[task][0])().named_parameters()}
    assert set(row["gains"]) == names
    for stats in row["gains"].values():
        assert stats["max"][0] == 1.0  # gains are 1 until the second epoch's end
        assert stats["grew"][0] is None and stats["grew"][1] is not None


@pytest.mark.parametrize("task", robustness.CONFIRM_TASKS)
def test_confirmation_tasks_learn(task):
    row = robustness.run_one(robustness._run(task, "SGD", "base", 0.05, 0,
                                             robustness.RulesConfig(epochs=3)))
    assert row["batch_size"] == robustness.TASK_BATCH_SIZE.get(task, 64)
    assert row["final_train_loss"] < row["train_loss"][0]
    assert row["final_test_accuracy"] > 0.5  # far above chance (digits 10 %, R² 0)


def test_r2_score_reads_as_an_accuracy():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert r2_score(target, target) == 1.0
    assert r2_score(target + 1, target) == pytest.approx(1 - 4 / 5)  # SSE 4, SST 5
    assert r2_score(torch.full((4,), 10.0), target) == 0.0  # worse than the mean: floored
    assert r2_score(torch.full((4,), float("nan")), target) == 0.0  # diverged


def test_batch_norm_is_evaluated_with_running_statistics():
    # the digits' test set has pixels that are constant in the training set (huge once
    # standardised): with the test batch's own statistics every prediction would be poisoned
    history = train(robustness.rescnn, lambda params, spe: torch.optim.SGD(params, lr=0.1,
                    momentum=0.9), load_digits(0), 3, 128, 0)
    assert history["test_accuracy"][-1] > 0.5


def test_paired_differences_separate_only_a_consistent_gap():
    accuracy = {"base": [0.9] * 4, "a": [0.90, 0.91, 0.92, 0.93],
                "b": [0.85, 0.86, 0.87, 0.88],  # 5 points below a in every seed
                "c": [0.86, 0.93, 0.88, 0.95]}  # +4, -2, +4, -2 points from a: noise
    rows = [dict(task="t", pair="SGD", candidate=c, lr=0.1, seed=s, batch_size=64,
                 final_test_accuracy=values[s]) for c, values in accuracy.items() for s in range(4)]
    rows += [dict(r, lr=1e-6, final_test_accuracy=0.1) for r in rows]  # base < 50 %: left out
    (gap,) = robustness.paired_differences(rows, "a", "b", (1e-6, 0.1))
    assert (gap["seeds"], gap["separated"]) == (4, True)
    assert gap["mean"] == pytest.approx(5.0) and gap["error"] == pytest.approx(0.0, abs=1e-9)
    (noise,) = robustness.paired_differences(rows, "a", "c", (1e-6, 0.1))
    assert noise["mean"] == pytest.approx(1.0) and not noise["separated"]


def test_schedule_free_is_switched_to_eval_for_each_evaluation():
    calls = []

    class Recording(torch.optim.SGD):
        def train(self):
            calls.append("train")

        def eval(self):
            calls.append("eval")

    train("mlp", lambda params, spe: Recording(params, lr=0.1), load_digits(0), 2, 512, 0)
    assert calls == ["train", "eval", "train", "eval"]
    row = robustness.run_one(dict(task="mlp", pair="SF-AdamW", candidate="anchor", lr=2.5e-3,
                                  seed=0, epochs=1, batch_size=64))
    assert row["final_test_accuracy"] > 0.5 and row["gains"] == {} and row["backend"] == ""


TINY = robustness.RulesConfig(
    selection_tasks=("mlp",), heldout_tasks=(), pairs=("AdamW",), candidates=("paper",),
    lrs=(1e-3,), seeds=1, epochs=1, batch_sizes=(64, 128), anchors=("SF-AdamW",),
    anchor_exponents=(0,), phases=("selection", "batch", "anchors"))


def test_tiny_study_end_to_end_and_resumed(tmp_path, monkeypatch):
    summary = robustness.run(TINY, str(tmp_path), workers=1)
    # selection: base, paper; batch: both at 64 (the selection's runs) and 128; one anchor run
    journal = (tmp_path / "rules_runs.jsonl").read_text().splitlines()
    assert len(journal) == 2 + 2 + 1
    assert summary["runs"]["batch"]["finished"] == 4
    assert summary["batch"]["lrs"] == {"mlp": 1e-3}
    with open(tmp_path / "rules_selection.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["candidate"] for r in rows] == ["base", "paper"]
    assert rows[1]["backend"] == "foreach" and float(rows[1]["gain_max_final"]) == 1.0
    saved = json.loads((tmp_path / "rules.json").read_text())
    assert saved["selection"]["ranking"] == {"Adam family": ["paper"]}
    assert "| mlp | AdamW | SF-AdamW |" in (tmp_path / "rules.md").read_text()

    ran = []
    monkeypatch.setattr(robustness, "run_one", lambda task: ran.append(task) or 1 / 0)
    again = robustness.run(TINY, str(tmp_path), workers=1)
    assert ran == [] and again["runs"]["anchors"]["finished"] == 1
    # a new candidate runs only its own runs
    robustness.run(dataclasses.replace(TINY, candidates=("paper", "max_gain=10"),
                                       phases=("selection",)), str(tmp_path), workers=1)
    assert [(t["candidate"], t["lr"]) for t in ran] == [("max_gain=10", 1e-3)]


def test_confirm_phase_runs_every_candidate_without_a_selection(tmp_path):
    config = dataclasses.replace(TINY, confirm_tasks=("friedman",), pairs=("SGD",),
                                 candidates=("paper", "max_gain=10", "gain_inc=0.5"), seeds=2,
                                 phases=("confirm",))
    summary = robustness.run(config, str(tmp_path), workers=1)
    assert "selection" not in summary and summary["runs"]["confirm"]["finished"] == 8
    assert {r["candidate"] for r in summary["confirm"]["criteria"]} == {
        "base", "paper", "max_gain=10", "gain_inc=0.5"}
    # the candidates after the paper rule, side by side
    assert list(summary["confirm"]["paired"]) == ["max_gain=10 - gain_inc=0.5"]
    text = (tmp_path / "rules.md").read_text()
    assert "## Confirmation on new tasks" in text and "| SGD | friedman |" in text


def test_cli_runs_the_rules_study(tmp_path):
    main(["sweep", "--study", "rules", "--quick", "--optimizers", "AdamW", "--lrs", "1e-3",
          "--epochs", "1", "--candidates", "paper", "--phases", "selection", "--workers", "1",
          "--out", str(tmp_path)])
    assert (tmp_path / "rules.md").read_text().count("| Adam family | mlp |") == 2
