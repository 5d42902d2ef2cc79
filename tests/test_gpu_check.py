"""scripts/gpu_check.sh as far as a machine without a GPU can check it: it refuses to run without
CUDA, its dry run drives every stage (time limits, the CPU benchmark, the report), the report
script reads junit XML and benchmark JSON correctly, and the scripts are shellcheck-clean."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

_spec = importlib.util.spec_from_file_location("gpu_check_report",
                                               ROOT / "scripts" / "gpu_check_report.py")
gpu_check_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check_report)


def _gpu_check(*args, env=None, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_exits_at_once_without_cuda(tmp_path):
    result = _gpu_check(str(tmp_path / "out"), timeout=60)
    assert result.returncode == 2
    assert "no CUDA device visible" in result.stderr and "--dry-run" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_refuses_an_out_dir_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = _gpu_check("--dry-run", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "holds files of something else" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without CUDA")
def test_dry_run_drives_every_stage_and_writes_the_report(tmp_path):
    """The tests stage is given a 3 s limit here, so that it is stopped (and reported as such)
    while its pytest shards still start up; the sanitizer's workload and the benchmark run on
    the CPU."""
    out = tmp_path / "out"
    result = _gpu_check("--dry-run", str(out), env={"LIMIT_TESTS": "3"})
    assert result.returncode == 1, result.stdout + result.stderr  # the tests stage was stopped
    stages = {row[0]: row for row in gpu_check_report.read_stages(out)}
    assert list(stages) == ["build", "tests", "sanitizer", "bench"]
    assert stages["build"][1] == "skipped" and stages["sanitizer"][1] == "passed"
    assert stages["tests"][1:2] + stages["tests"][3:4] == ["stopped at its time limit", "3"]
    assert int(stages["tests"][2]) < 20  # the shards were stopped with it
    assert stages["bench"][1] == "passed"
    report = (out / "report.md").read_text()
    assert "dry run: true" in report
    assert "| tests | stopped at its time limit |" in report
    assert "no junit XML: the shard was stopped" in report
    assert "| 1M / 4 tensors / float32 | ActiveAdamW cpu compact |" in report
    assert json.loads((out / "bench-1M.json").read_text())["rows"]
    assert "cpu ActiveAdaBelief: 6 steps" in (out / "sanitizer-dry-run.txt").read_text()
    # a second run replaces the first one's files
    assert _gpu_check("--dry-run", str(out), env=dict(LIMIT_TESTS="1", LIMIT_SANITIZER="1",
                                                     LIMIT_BENCH="1")
                      ).returncode == 1
    assert "| bench | stopped at its time limit |" in (out / "report.md").read_text()


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.cuda" name="test_cuda_graphs_replay_every_boundary_kind[cuda]"/>
<testcase classname="tests.cuda" name="test_cuda_graphs_replay_every_boundary_kind[triton]">
<failure message="AssertionError: step counters differ&#10;more">trace</failure></testcase>
<testcase classname="tests.cuda" name="test_steps_never_sync_with_the_host">
<skipped message="no GPU"/></testcase>
<testcase classname="tests.test_amp" name="test_grad_scale_unscales[cuda-triton]"/>
</testsuite></testsuites>
"""


def _bench_row(optimizer, baseline, ratio, byte_floor=None):
    return {"size": "100M", "tensors": "200", "dtype": "float32", "optimizer": optimizer,
            "median_ms": 1.0, "gb_per_s": 3000.0, "fraction_of_ceiling": 0.75,
            "baseline": baseline, "ratio_to_baseline": ratio, "byte_floor": byte_floor}


def test_report_counts_tests_and_compares_step_times_with_the_byte_floors(tmp_path):
    (tmp_path / "stages.tsv").write_text("tests\tfailed (exit 1)\t99\t200\tper-test limit\n")
    (tmp_path / "junit-cuda_backend.xml").write_text(JUNIT)
    (tmp_path / "pytest-cuda_backend.log").write_text("")
    (tmp_path / "pytest-triton_backend.log").write_text(
        "[per-test timeout 120 s] running tests/a.py::test_one\n"
        "[per-test timeout 120 s] running tests/a.py::test_hangs\nThread 0x1 (most recent...")
    (tmp_path / "sanitizer-memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "bench-100M.json").write_text(json.dumps({
        "ceiling": "Copy bandwidth", "ceiling_gb_per_s": 4000.0,
        "rows": [_bench_row("ActiveAdamW triton", "torch AdamW fused", 1.5, 40 / 28),
                 _bench_row("ActiveAdamW triton compact", "torch AdamW fused", 1.5, 34 / 28),
                 _bench_row("ActiveSGD cuda", "torch SGD fused", 1.9, 32 / 20),
                 _bench_row("ActiveRAdam cuda", "torch RAdam foreach", 1.1, 40 / 28),
                 _bench_row("torch AdamW fused", None, None)]}))
    report = gpu_check_report.report(tmp_path)
    assert "| tests | failed (exit 1) | 99 | 200 | per-test limit |" in report
    assert "| cuda_backend | 2 | 1 | 0 | 1 | junit-cuda_backend.xml |" in report
    assert "stopped while running `tests/a.py::test_hangs`" in report
    assert "Failures: 1" in report
    assert "Skip reasons: 1\n- 1 × no GPU" in report
    assert "[triton]`: AssertionError: step counters differ" in report
    assert "- CUDA graphs, every boundary kind (cuda backend): passed (1 test(s))" in report
    assert "- CUDA graphs, every boundary kind (triton backend): failed (1 test(s))" in report
    assert "- no host sync per step (cuda backend): skipped (1 test(s))" in report
    assert "- no host sync per step (triton backend): not run" in report
    assert "- memcheck: 0 errors (sanitizer-memcheck.log)" in report
    assert "| ActiveAdamW triton | 1.000 | 3000 | 75% | 1.50× torch AdamW fused | 1.43× | yes |" \
        in report
    # the floor is each row's own: compact state moves fewer bytes
    assert "| ActiveAdamW triton compact | 1.000 | 3000 | 75% | 1.50× torch AdamW fused | 1.21× | no |" \
        in report
    assert "| 1.90× torch SGD fused | 1.60× | no |" in report
    # only ActiveAdamW's and ActiveSGD's rows are compared
    assert "torch AdamW fused | 1.000" not in report and "ActiveRAdam" not in report


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    scripts = sorted(str(path) for path in (ROOT / "scripts").glob("*.sh"))
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
