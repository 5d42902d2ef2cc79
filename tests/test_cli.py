"""`adaptive-lr`: argument handling of every subcommand, and a tiny end-to-end sweep."""

import csv
import json
import math

import pytest

from adaptive_lr.cli import main


@pytest.mark.parametrize("argv,expected", [
    (["--help"], "sweep"),
    (["demo", "--help"], "--epochs"),
    (["sweep", "--help"], "--lrs"),
    (["bench", "--help"], "--sizes"),  # the benchmark's own options
])
def test_help_of_each_subcommand(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["demo", "--lr", "0"], "positive"),
    (["demo", "--lr", "nan"], "positive"),
    (["demo", "--epochs", "1.5"], "positive integer"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["sweep", "--lrs", "1e-3", "abc"], "positive"),
    (["sweep", "--lrs=-1e-3"], "positive"),
    (["sweep", "--seeds", "0"], "positive integer"),
    (["sweep", "--epochs", "-2"], "positive integer"),
    (["sweep", "--workers", "0"], "positive integer"),
    (["sweep", "--models", "resnet"], "invalid choice"),
    (["sweep", "--optimizers", "Adagrad"], "invalid choice"),
    (["sweep", "--study", "both"], "invalid choice"),
    (["sweep", "--problems", "sphere"], "invalid choice"),
    (["bench", "--sizes", "3M"], "invalid choice"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys, tmp_path):
    out = tmp_path / "results"
    if argv[:1] == ["sweep"]:
        argv = argv + ["--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was run or written


def test_tiny_sweep_end_to_end(tmp_path):
    lrs, seeds, pairs = ["1e-3", "1e-1"], 2, ["SGD", "AdamW"]
    main(["sweep", "--study", "lr", "--models", "mlp", "--optimizers", *pairs, "--lrs", *lrs,
          "--seeds", str(seeds), "--epochs", "3", "--workers", "1", "--out", str(tmp_path)])

    with open(tmp_path / "lr_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(pairs) * 2 * len(lrs) * seeds
    assert {"model", "optimizer", "lr", "seed", "final_train_loss", "final_test_accuracy",
            "best_test_accuracy", "epochs_to_target"} <= set(rows[0])
    assert {r["optimizer"] for r in rows} == {"SGD", "ActiveSGD", "AdamW", "ActiveAdamW"}
    assert {float(r["lr"]) for r in rows} == {1e-3, 1e-1}
    for r in rows:
        assert math.isfinite(float(r["final_train_loss"]))
        assert 0 <= float(r["final_test_accuracy"]) <= float(r["best_test_accuracy"]) <= 1
        assert r["epochs_to_target"] == "" or 1 <= int(r["epochs_to_target"]) <= 3

    with open(tmp_path / "lr_sweep.json") as f:
        summary = json.load(f)
    assert len(summary["cells"]) == len(pairs) * 2 * len(lrs)
    assert all(c["runs"] == seeds for c in summary["cells"])
    assert len(summary["spreads"]) == len(pairs) * 2
    for s in summary["spreads"]:
        assert 0 <= s["final_accuracy_spread"] <= 1
    assert "| ActiveAdamW |" in (tmp_path / "lr_sweep.md").read_text()
    assert (tmp_path / "lr_sweep_mlp.png").stat().st_size > 10_000
