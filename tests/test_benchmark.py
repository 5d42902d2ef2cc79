"""The step-time benchmark's accounting (adaptive_lr/benchmark.py): the bytes each contender moves
per element, its byte floor against torch's fused step, the size of its state, with full and
compact state, and the table of a tiny run."""

import json

import pytest
import torch

from adaptive_lr import benchmark
from adaptive_lr.benchmark import contenders, make_tensors, state_bytes, step_extra_memory


def _contenders(backends=("cpu",), precisions=("full", "compact", "bfloat16")) -> dict:
    return {c.name: c for c in contenders(list(backends), 4000, precisions)}


@pytest.mark.parametrize(("name", "fp32", "bf16"), [
    ("torch AdamW fused", 28, 14),
    ("torch SGD fused", 20, 10),
    # + gain read, grad_sum read + write: 4 B each with full state, 2 with compact; the moments
    # stay fp32 for bf16 params. ActiveSGD and ActiveLion: + grad_sq_sum read + write (their
    # default sign test)
    ("ActiveAdamW cpu", 40, 34),
    ("ActiveAdamW cpu compact", 34, 28),
    ("ActiveSGD cpu", 40, 34),
    ("ActiveSGD cpu compact", 30, 24),
    ("ActiveLion cpu compact", 30, 24),
    # state_precision="bfloat16": the momentum read and written in 2 B
    ("ActiveSGD cpu bfloat16", 26, 20),
    ("ActiveLion cpu bfloat16", 26, 20),
    ("Active(torch AdamW fused)", 64, 38),
    # + its epoch sum of g**2 (the sign test, SGD having no second moment): read + write, 4 B
    ("Active(torch SGD fused)", 64, 42),
])
def test_bytes_per_element(name, fp32, bf16):
    contender = _contenders()[name]
    assert (contender.bytes_per_element(4), contender.bytes_per_element(2)) == (fp32, bf16)


def test_every_active_optimizer_has_a_compact_contender_the_wrapper_none():
    names = _contenders(("foreach", "cpu"))
    for cls in benchmark._active_optimizers():
        for backend in ("foreach", "cpu"):
            full = names[f"{cls.__name__} {backend}"]
            compact = names[f"{cls.__name__} {backend} compact"]
            assert (full.sign_bytes, compact.sign_bytes) == (4, 2)
            assert full.baseline == compact.baseline
        # compared with the same precision on the foreach backend
        twin = names[f"{cls.__name__} cpu compact"].foreach_twin
        assert twin == f"{cls.__name__} foreach compact"
    assert not [name for name in names if name.startswith("Active(") and "compact" in name]
    only_compact = _contenders(precisions=("compact",)).values()
    assert all(c.name.endswith(" compact") for c in only_compact if c.sign_bytes)
    # state_precision="bfloat16": the optimizers that offer it
    assert sorted(name for name in names if name.endswith(" cpu bfloat16")) == [
        "ActiveLion cpu bfloat16", "ActiveSGD cpu bfloat16"]


# 4 tensors of 1000; per-param scalars: step float32 (4 B), the Active optimizers' epoch int64 (8)
# and has_prev_sign bool (1), compact state's rounding_seed int64 (8)
@pytest.mark.parametrize(("name", "expected"), [
    ("torch AdamW fused", 8 * 4000 + 4 * 4),
    ("ActiveAdamW cpu", (8 + 9) * 4000 + (4 + 8 + 1) * 4),
    ("ActiveAdamW cpu compact", (8 + 5) * 4000 + (4 + 8 + 1 + 8) * 4),
    ("ActiveSGD cpu compact", (4 + 7) * 4000 + (4 + 8 + 1 + 8) * 4),  # + grad_sq_sum, bf16
    ("ActiveSGD cpu bfloat16", (2 + 7) * 4000 + (4 + 8 + 1 + 8) * 4),  # + its momentum in bf16
    ("ActiveLion cpu", (4 + 13) * 4000 + (4 + 8 + 1) * 4),
    ("Active(torch AdamW fused)", 8 * 4000 + 4 * 4 + 9 * 4000 + (8 + 1) * 4),  # inner + gains
    ("Active(torch SGD fused)", 4 * 4000 + 13 * 4000 + (8 + 1) * 4),  # + its sum of g**2
])
def test_state_bytes_counts_every_state_tensor(name, expected):
    optimizer = _contenders()[name].make(make_tensors(4000, "4", torch.float32))
    optimizer.step()
    assert state_bytes(optimizer) == expected


# the study's anchors, as the study builds them; 4 tensors of 1000 float32
@pytest.mark.parametrize(("name", "baseline", "fp32", "state"), [
    ("DoG", "torch SGD fused", 20, 4 * 4000 + 3 * 4),  # x0 (in its param group), rbar, G, eta
    ("DAdaptSGD", "torch SGD fused", 36, 3 * 4 * 4000),  # s, z, x0
    ("Prodigy", "torch AdamW fused", 44, 4 * 4 * 4000),  # exp_avg, exp_avg_sq, s, p0
])
def test_the_anchors_are_timed_beside_the_torch_step_of_their_kind(name, baseline, fp32, state):
    contender = _contenders()[name]
    assert (contender.baseline, contender.bytes_per_element(4)) == (baseline, fp32)
    optimizer = contender.make(make_tensors(4000, "4", torch.float32))
    optimizer.step()
    assert state_bytes(optimizer) == state


@pytest.mark.parametrize("name", ["ActiveAdamW cpu", "ActiveAdamW cpu compact",
                                  "ActiveSGD cpu bfloat16"])
def test_a_cpu_backend_step_allocates_no_param_sized_temporaries(name):
    optimizer = _contenders()[name].make(make_tensors(4_000_000, "4", torch.float32))
    optimizer.step()
    extra = step_extra_memory(optimizer.step)
    if extra is None:
        pytest.skip("/proc cannot tell the peak memory of a step here")
    assert extra < 2**20  # one fp32 temporary of a tensor would be 3.8 MiB


# the run warns nothing: building a contender must not trip the short-epoch warning
@pytest.mark.filterwarnings("error")
def test_a_tiny_run_reports_bytes_floor_and_state_per_contender(monkeypatch):
    monkeypatch.setitem(benchmark.SIZES, "4K", 4000)
    monkeypatch.setattr(benchmark, "streaming_ceiling_gbs", lambda size, repeats: 10.0)
    result = benchmark.run(["4K"], ["4"], [torch.float32], 1, 2, ["cpu"])
    json.dumps(result)  # the JSON output holds every field
    rows = {row["optimizer"]: row for row in result["rows"]}
    compact = rows["ActiveAdamW cpu compact"]
    assert compact["bytes_per_element"] == 34 and compact["baseline"] == "torch AdamW fused"
    assert compact["byte_floor"] == 34 / 28
    assert compact["state_mib"] == ((8 + 5) * 4000 + 21 * 4) / 2**20
    assert compact["ratio_to_baseline"] > 0 and "extra_memory_mib" in compact
    assert rows["torch AdamW fused"]["byte_floor"] is None
    # ActiveSGD with its default sign test: its measured state holds grad_sq_sum (bfloat16)
    sgd = rows["ActiveSGD cpu compact"]
    assert (sgd["bytes_per_element"], sgd["baseline"]) == (30, "torch SGD fused")
    assert sgd["byte_floor"] == 30 / 20 and sgd["ratio_to_baseline"] > 0
    assert sgd["state_mib"] == ((4 + 7) * 4000 + 21 * 4) / 2**20
    table = benchmark.markdown(result)
    assert "| vs baseline | byte floor | vs own foreach | state MiB | extra MiB |" in table
    assert "| 4K | 4 | float32 | ActiveAdamW cpu compact | " in table
    assert f"× torch AdamW fused | 1.21× |  | {compact['state_mib']:.1f} |" in table
    for anchor, baseline in (("DoG", "SGD"), ("DAdaptSGD", "SGD"), ("Prodigy", "AdamW")):
        assert rows[anchor]["ratio_to_baseline"] > 0
        assert f"| 4K | 4 | float32 | {anchor} | " in table
        assert f"× torch {baseline} fused | " in table.split(f"| {anchor} | ")[1].splitlines()[0]


def test_optimizers_selects_active_optimizers_with_their_torch_baselines():
    entries = benchmark.select(contenders(["foreach", "cpu"], 4000), ["ActiveSGD"])
    assert [c.name for c in entries] == [
        "torch SGD fused", "ActiveSGD foreach", "ActiveSGD foreach compact", "ActiveSGD cpu",
        "ActiveSGD cpu compact"]
    assert benchmark.select(entries, None) is entries


def test_a_case_too_large_for_memory_is_refused_before_measuring(monkeypatch, capsys):
    # gpt2-small's 124M params with every contender: about 31 GiB on a CPU
    monkeypatch.setattr(benchmark, "available_memory", lambda device: 20 * 2**30)
    monkeypatch.setattr(benchmark, "run", lambda *args: pytest.fail("measured"))
    with pytest.raises(SystemExit):
        benchmark.main(["--sizes", "gpt2-small", "--backends", "cpu", "--dtypes", "float32"])
    error = capsys.readouterr().err
    assert "--sizes gpt2-small: its params, grads and every contender's state need about" in error
    assert "20.0 GiB free: time fewer at once (--optimizers, --state-precision" in error
    # two optimizers, compact state only: about 5 GiB
    needed = benchmark.memory_needed("gpt2-small", torch.float32, ["cpu"], ("compact",),
                                     ["ActiveAdamW", "ActiveSGD"], torch.device("cpu"))
    assert 4 * 2**30 < needed < 6 * 2**30


def test_the_report_names_the_cpu_and_the_simd_path_the_kernels_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(benchmark.SIZES, "4K", 4000)
    monkeypatch.setattr(benchmark, "streaming_ceiling_gbs", lambda size, repeats: 10.0)
    out = tmp_path / "bench.json"
    result = benchmark.main(["--sizes", "4K", "--layouts", "4", "--dtypes", "float32",
                             "--backends", "cpu", "--optimizers", "ActiveSGD", "--rounds", "1",
                             "--steps-per-round", "1", "--json", str(out)])
    simd = f"SIMD {torch.ops.adaptive_lr.cpu_capability()}"
    assert result["machine"]["simd"] == simd
    assert json.loads(out.read_text())["machine"]["simd"] == simd
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith(f"{result['machine']['processor']}, {simd}, ")
