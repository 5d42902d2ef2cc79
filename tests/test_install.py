"""The installed package: the environment variables that configure it (ADAPTIVE_LR_BACKEND,
ADAPTIVE_LR_JIT), the fused kernels compiled on first use where adaptive_lr._C does not load,
and (slow) the wheel installed into a fresh virtual environment (scripts/check_wheel.sh)."""

import os
import subprocess
import sys

import pytest
import torch

from adaptive_lr import ActiveAdamW, backends


def _params():
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize("value", ["CPU", "fused", "auto "])
def test_a_bad_backend_variable_names_itself_the_value_and_the_choices(value, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_LR_BACKEND", value)
    with pytest.raises(ValueError) as error:
        ActiveAdamW(_params(), steps_per_epoch=None)
    assert str(error.value) == (
        f"ADAPTIVE_LR_BACKEND={value!r} is no adaptive_lr backend; choose one of auto, "
        "reference, foreach, cpu, cuda, triton")


def test_an_unavailable_backend_from_the_variable_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("ADAPTIVE_LR_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"^adaptive_lr backend 'cuda' \(chosen by "
                                           r"ADAPTIVE_LR_BACKEND\) is unavailable on cpu: "):
        ActiveAdamW(_params(), steps_per_epoch=None)


def test_the_backend_variable_overrides_auto_only_and_empty_is_unset(monkeypatch):
    monkeypatch.delenv("ADAPTIVE_LR_BACKEND", raising=False)
    unset = backends.resolve("auto", "cpu")
    monkeypatch.setenv("ADAPTIVE_LR_BACKEND", "")
    assert backends.resolve("auto", "cpu") is unset
    monkeypatch.setenv("ADAPTIVE_LR_BACKEND", "reference")
    assert backends.resolve("auto", "cpu") is backends._module("reference").step
    assert backends.resolve("foreach", "cpu") is backends._module("foreach").step


# a Python where adaptive_lr._C does not import, as after a pure-Python install
WITHOUT_AOT_EXTENSION = "import sys\nsys.modules['adaptive_lr._C'] = None\n"
REPORT = """
import warnings
import torch
import adaptive_lr
from adaptive_lr.backends import unavailable_reason
print(adaptive_lr.available_backends("cpu"))
print(unavailable_reason("cpu", "cpu"))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    adaptive_lr.ActiveAdamW([torch.zeros(2, requires_grad=True)], steps_per_epoch=None)
print(caught[0].message)
"""


def _python(code: str, cache, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache), **env})


def test_jit_off_cpu_backend_unavailable_with_the_reason_and_auto_warns(tmp_path):
    result = _python(WITHOUT_AOT_EXTENSION + REPORT, tmp_path, ADAPTIVE_LR_JIT="0")
    assert result.returncode == 0, result.stderr
    backends_here, reason, warning = result.stdout.splitlines()
    assert "'foreach'" in backends_here and "'cpu'" not in backends_here
    assert reason.startswith("adaptive_lr._C does not load (import of adaptive_lr._C halted")
    assert reason.endswith(
        "and ADAPTIVE_LR_JIT=0 turns off compiling the kernels on first use: unset "
        "ADAPTIVE_LR_JIT, or reinstall adaptive_lr with torch importable at build time (pip "
        "install --no-build-isolation)")
    assert warning == (f"adaptive_lr: the fused 'cpu' backend is unavailable ({reason}); using "
                       "'foreach', which is much slower")
    assert "building" not in result.stderr and not (tmp_path / "adaptive_lr").exists()


def test_jit_without_ninja_says_pip_install_ninja(tmp_path):
    no_ninja = "import torch.utils.cpp_extension as c\nc.is_ninja_available = lambda: False\n"
    result = _python(WITHOUT_AOT_EXTENSION + no_ninja + REPORT, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].endswith(
        ", and compiling the kernels on first use needs ninja: pip install ninja")
    assert not (tmp_path / "adaptive_lr").exists()


def test_a_bad_jit_variable_names_itself(tmp_path):
    result = _python(WITHOUT_AOT_EXTENSION + REPORT, tmp_path, ADAPTIVE_LR_JIT="no")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ValueError: ADAPTIVE_LR_JIT='no': expected 1 (compile the fused CPU kernels on first "
        "use, the default) or 0 (never)")


@pytest.mark.slow
def test_the_wheel_and_a_pure_python_install_in_a_fresh_virtual_environment():
    """scripts/check_wheel.sh: builds the wheel, installs it into a fresh venv with torch only
    and runs the fused backend; then a plain `pip install .` compiles the kernels on first use."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(["bash", os.path.join(root, "scripts", "check_wheel.sh")],
                            capture_output=True, text=True,
                            env={**os.environ, "ADAPTIVE_LR_VENV": sys.prefix})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].endswith("all checks passed")
