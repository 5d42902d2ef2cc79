"""`adaptive-lr`: argument handling of every subcommand, and a tiny end-to-end sweep."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

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
    (["bench", "--rounds", "0"], "positive integer"),
    (["bench", "--steps-per-round", "0"], "positive integer"),
    (["bench", "--threads", "0"], "positive integer"),
    (["bench", "--threads", "-1"], "positive integer"),
    (["bench", "--dtypes", "float16"], "invalid choice"),
    (["bench", "--layouts", "7"], "invalid choice"),
    (["bench", "--backends", "foo"], "invalid choice"),
    (["bench", "--state-precision", "half"], "invalid choice"),
    (["bench", "--backends", "cuda"], "--backends cuda: unavailable on cpu"),
    (["bench", "--json", "."], "is a directory"),
    (["demo", "--seed", "-1"], "expected an integer from 0 to 2**32 - 1"),
    (["demo", "--seed", "4294967296"], "expected an integer from 0 to 2**32 - 1"),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_bench_json_that_cannot_be_written_fails_before_measuring(capsys, tmp_path):
    """(It used to fail after measuring, losing the results.)"""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--sizes", "50M", "--json", str(tmp_path / "a_file" / "out.json")])
    assert exit_info.value.code == 2
    assert "cannot create its folder" in capsys.readouterr().err


def test_bench_on_cuda_without_cuda_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


# The `study` extra of setup.py, made unimportable as on a plain `pip install adaptive_lr` (a None
# in sys.modules: find_spec says absent, import raises); torch then warns that it found no numpy.
STUDY_EXTRA = ("numpy", "sklearn", "tqdm", "matplotlib", "adabelief_pytorch")


def _cli_without_study_extra(argv: list[str], modules=STUDY_EXTRA) -> subprocess.CompletedProcess:
    code = (f"import sys\nsys.modules.update(dict.fromkeys({modules!r}))\n"
            f"from adaptive_lr.cli import main\nmain({argv!r})\n")
    return subprocess.run(
        [sys.executable, "-W", "ignore:Failed to initialize NumPy:UserWarning", "-c", code],
        capture_output=True, text=True)


@pytest.mark.parametrize("argv,expected", [
    (["--help"], "sweep"),
    (["bench", "--help"], "--sizes"),
    (["bench", "--sizes", "1M", "--layouts", "4", "--dtypes", "float32", "--backends", "foreach",
      "--rounds", "1", "--steps-per-round", "1"], "| ActiveAdamW foreach compact |"),
])
def test_help_and_bench_need_no_study_extra(argv, expected):
    result = _cli_without_study_extra(argv)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


@pytest.mark.parametrize("command", ["sweep", "demo"])
def test_study_commands_without_the_extra_say_how_to_get_it(command, tmp_path):
    result = _cli_without_study_extra([command, "--quick"] + (
        ["--out", str(tmp_path / "out")] if command == "sweep" else []))
    assert result.returncode == 1
    module = "numpy" if command == "sweep" else "sklearn"
    assert result.stderr.strip().splitlines() == [
        f"adaptive-lr {command} needs the study extra (import of {module} halted; None in "
        "sys.modules): pip install 'adaptive_lr[study]'"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", ["dog", "dadaptation"])
def test_the_rules_study_without_an_anchor_package_says_how_to_get_it(module, tmp_path):
    # were it not checked up front: twelve one-epoch anchor runs, then no error
    result = _cli_without_study_extra(
        ["sweep", "--study", "rules", "--quick", "--optimizers", "SGD", "--phases", "anchors",
         "--epochs", "1", "--workers", "1", "--out", str(tmp_path / "out")], (module,))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"adaptive-lr sweep needs the study extra (import of {module} halted; None in "
        "sys.modules): pip install 'adaptive_lr[study]'"]


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
