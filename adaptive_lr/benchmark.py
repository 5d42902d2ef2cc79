"""Optimizer step-time benchmark: torch's AdamW/SGD/RAdam (for-loop, foreach, fused) against the
Active optimizers on every available backend, in the state_precisions --state-precision names, and
the training-quality study's parameter-free anchors where installed, measured side by side in one
run.

For every (size, layout, dtype) case all optimizers step the SAME params and grads (the values
drift, the cost does not), in interleaved rounds so that machine noise hits them alike. Reports
the median and spread of the step time, the ratio to torch's fused (else foreach) counterpart,
and GB/s from the bytes each step must move against a streaming ceiling measured in the same run;
beside the ratio, the byte floor (the ratio a bandwidth-bound step would reach), and the size of
each optimizer's state.

On a CUDA device (--device cuda) steps are timed with CUDA events after warm-up steps, each
optimizer cycles through copies of the params and grads that together span three times the L2
cache (so no step finds its tensors cached by the step before), and the ceiling is the device's
copy bandwidth measured in the same run.

    python -m adaptive_lr.benchmark --sizes 1M 10M --json bench/results/step_time.json
    python -m adaptive_lr.benchmark --device cuda --sizes 1M 50M
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

import adaptive_lr
from adaptive_lr import Active
from adaptive_lr.optim import ActiveOptimizer
from adaptive_lr.optim.wrapper import MEAN_SQUARES
from adaptive_lr.model_shapes import MODELS, param_count
from adaptive_lr.study.robustness import ANCHORS, make_anchor
from adaptive_lr.study.options import positive_int

SIZES = {"1M": 1_000_000, "10M": 10_000_000, "50M": 50_000_000, "100M": 100_000_000}

# Bytes per element a steady-state (mid-epoch) step must move: params and grads in the param
# dtype, moments in their state dtype. Active optimizers read gain and grad_sum and write
# grad_sum on top of their base (prev_sign is touched only at a boundary: once per epoch), and
# ActiveSGD and ActiveLion with their sign test read and write grad_sq_sum too.
#   torch AdamW/RAdam: read p, g, m, v; write p, m, v.  torch SGD (and Lion, fused): read p, g,
#   b; write p, b.  Active*: + read gain, read + write each epoch sum (``sign_bytes`` each: 4
#   with full state, 2 with compact), their moments float32 (bfloat16 with state_precision
#   "bfloat16").
def bytes_per_element(moments: int, param_bytes: int, moment_bytes: int, sign_bytes: int = 0,
                      squares: bool = False) -> int:
    total = 2 * param_bytes + param_bytes  # read p, g; write p
    total += 2 * moments * moment_bytes  # read + write each moment
    return total + (3 + 2 * squares) * sign_bytes  # gain read; each epoch sum read + write


# Active(optimizer) moves this on top of its inner optimizer: the snapshot (read p, write it) and
# its pass (read p, snapshot, grad, gain; read + write grad_sum; write p); with ``squares`` (the
# sign test's epoch sum of g**2, kept for an inner optimizer with no second moment to read) it
# reads and writes that too.
def wrapper_extra_bytes(param_bytes: int, squares: bool) -> int:
    return 6 * param_bytes + 4 + 2 * 4 + (2 * 4 if squares else 0)


# element size of an Active optimizer's gain and grad_sum per state_precision (bfloat16: compact),
# and of its moments
SIGN_BYTES = {"full": 4, "compact": 2, "bfloat16": 2}
MOMENT_BYTES = {"full": 4, "compact": 4, "bfloat16": 2}
BOTH = ("full", "compact")  # --state-precision both


@dataclass
class Contender:
    name: str
    moments: int  # state tensors read and written per element (amsgrad off)
    make: callable  # params -> optimizer
    baseline: str | None = None  # the torch contender this one is compared with
    foreach_twin: str | None = None  # the same Active optimizer on the portable foreach backend
    sign_bytes: int = 0  # an Active optimizer's SIGN_BYTES; 0: no gains of its own
    moment_bytes: int = 4  # an Active optimizer's MOMENT_BYTES
    wrapped: bool = False  # Active(baseline): the baseline's traffic + wrapper_extra_bytes
    # keeps an epoch sum of g**2 (grad_sq_sum): ActiveSGD and ActiveLion at their default sign
    # test (``sign_bytes`` each), Active(baseline) whose inner optimizer has no second moment (fp32)
    squares: bool = False

    def bytes_per_element(self, param_bytes: int) -> int:
        if self.sign_bytes:  # Active optimizers' moments: fp32 (or bf16), whatever the param
            return bytes_per_element(self.moments, param_bytes, self.moment_bytes, self.sign_bytes,
                                     self.squares)
        moved = bytes_per_element(self.moments, param_bytes, param_bytes)
        return moved + (wrapper_extra_bytes(param_bytes, self.squares) if self.wrapped else 0)

    def state_bytes_per_element(self, param_bytes: int) -> int:
        """The size of its state per element, for the memory check before a run: torch keeps
        moments in the param dtype, Active optimizers in fp32 (or bf16), plus gain and the epoch sums
        (``sign_bytes`` each) and an int8 sign; the Active(...) wrapper adds fp32 ones (and its
        fp32 epoch sum of g**2 where it keeps one)."""
        if self.sign_bytes:
            return (self.moment_bytes * self.moments + (2 + self.squares) * self.sign_bytes
                    + 1)
        wrapper = 2 * 4 + 1 + 4 * self.squares if self.wrapped else 0
        return self.moments * param_bytes + wrapper


def select(entries: list[Contender], optimizers) -> list[Contender]:
    """The contenders of the Active optimizers named in ``optimizers`` (class names; None: all)
    and the torch steps they are compared with."""
    if optimizers is None:
        return entries
    kept = [c for c in entries if c.sign_bytes and c.name.split()[0] in optimizers]
    baselines = {c.baseline for c in kept}
    return [c for c in entries if c.name in baselines] + kept


def contenders(backends: list[str], size: int, precisions=BOTH) -> list[Contender]:
    """Every contender of a case; ``precisions``: the Active optimizers' state_precisions (the
    compact ones are named "<optimizer> <backend> compact", the "bfloat16" ones "... bfloat16";
    an optimizer that does not offer a precision has no contender for it)."""
    lr = 1e-4
    out = [
        Contender("torch AdamW for-loop", 2,
                  lambda p: torch.optim.AdamW(p, lr=lr, foreach=False)),
        Contender("torch AdamW foreach", 2,
                  lambda p: torch.optim.AdamW(p, lr=lr, foreach=True)),
        Contender("torch AdamW fused", 2,
                  lambda p: torch.optim.AdamW(p, lr=lr, fused=True)),
        Contender("torch Adam fused", 2, lambda p: torch.optim.Adam(p, lr=lr, fused=True)),
        Contender("torch SGD foreach", 1,
                  lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, foreach=True)),
        Contender("torch SGD fused", 1,
                  lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, fused=True)),
        Contender("torch RAdam foreach", 2,
                  lambda p: torch.optim.RAdam(p, lr=lr, foreach=True)),
    ]
    if size > 1_000_000:  # the for-loop baseline is only informative at the small size
        out = out[1:]
    out += _lr_free_anchors()
    # the inner optimizer with the gains of Active(optimizer), auto backend (cpu on a CPU)
    out += [Contender(f"Active({c.name})", c.moments,
                      lambda p, make=c.make: Active(make(p), steps_per_epoch=10**9),
                      c.name, wrapped=True,
                      squares=type(c.make([torch.zeros(1)])) not in MEAN_SQUARES)
            for c in out if c.name in ("torch AdamW fused", "torch SGD fused")]
    torch_names = {c.name for c in out}
    for backend in backends:
        if backend == "reference" and size > 1_000_000:
            continue  # a Python loop per tensor: minutes per round at 50M
        for cls in _active_optimizers():
            name = cls.__name__
            moments = len(cls.spec.state) - (cls.spec.amsgrad_state is not None)
            squares = _keeps_squares(cls)
            for precision in precisions:
                if precision == "bfloat16" and not cls.spec.offers_bfloat16_moments:
                    continue
                suffix = "" if precision == "full" else f" {precision}"
                out.append(Contender(
                    f"{name} {backend}{suffix}", moments,
                    # mid-epoch steps: the once-per-epoch boundary is not what this measures
                    lambda p, cls=cls, backend=backend, precision=precision: cls(
                        p, lr=1e-4, steps_per_epoch=10**9, backend=backend,
                        state_precision=precision),
                    _baseline(cls.spec, moments, torch_names),
                    (f"{name} foreach{suffix}" if backend != "foreach" and "foreach" in backends
                     else None),
                    SIGN_BYTES[precision],
                    MOMENT_BYTES[precision],
                    squares=squares,
                ))
    return out


# The study's parameter-free anchors (robustness.ANCHORS, docs/RESULTS.md §3.6 and §5.7): name ->
# (its package, its state tensors per element, the torch step of its kind). B/elem counts them as
# torch's steps are counted, each state tensor read and written, though p0 / x0 are only read and
# Prodigy, DoG and D-Adaptation SGD pass over memory twice a step (global sums, then the update):
# a model's count to compare with, not their implementations' traffic (docs/step_time.md).
ANCHOR_STEPS = {
    "Prodigy": ("prodigyopt", 4, "torch AdamW fused"),  # exp_avg, exp_avg_sq, s, p0
    "SF-AdamW": ("schedulefree", 2, "torch AdamW fused"),  # z, exp_avg_sq
    "DoG": ("dog", 1, "torch SGD fused"),  # x0
    "DAdaptSGD": ("dadaptation", 3, "torch SGD fused"),  # s, z, x0
}


def _lr_free_anchors() -> list[Contender]:
    """The anchors whose packages are installed (the study extra), built as the study builds them
    (robustness.make_anchor at the default lr)."""
    def make(name, params):
        optimizer = make_anchor(name, params, ANCHORS[name])
        if hasattr(optimizer, "train"):  # Schedule-Free steps only in train mode
            optimizer.train()
        return optimizer

    return [Contender(name, moments, functools.partial(make, name), baseline)
            for name, (package, moments, baseline) in ANCHOR_STEPS.items()
            if importlib.util.find_spec(package) is not None]


def _active_optimizers() -> list[type]:
    """Every Active optimizer (each class with its own spec), in a fixed order."""
    return sorted(ActiveOptimizer.__subclasses__(), key=lambda cls: cls.__name__)


def _keeps_squares(cls) -> bool:
    """Whether ``cls`` at its defaults keeps grad_sq_sum, its sign test's epoch sum of g**2
    (ActiveSGD, ActiveLion)."""
    group = cls([torch.zeros(1, requires_grad=True)], lr=1e-4, steps_per_epoch=None,
                backend="reference").param_groups[0]
    return cls.spec.keeps_grad_sq_sum(cls.spec.record(group))


def _baseline(spec, moments: int, torch_names: set[str]) -> str:
    """The torch contender an Active optimizer is compared with: its torch.optim base's fused
    step (else foreach) where that is benchmarked, else the fused step that moves the same bytes
    (torch has no AdaBelief or Lion: their ratio is against AdamW's or SGD's traffic)."""
    if spec.base is not None:
        short = spec.base.name.removeprefix("torch.optim.")
        for name in (f"torch {short} fused", f"torch {short} foreach"):
            if name in torch_names:
                return name
    return "torch AdamW fused" if moments == 2 else "torch SGD fused"


def make_tensors(size: int, layout: str, dtype: torch.dtype, device="cpu") -> list[torch.Tensor]:
    """``4``: four equal tensors; ``200``: 200 tensors of mixed sizes (a few large, many small,
    like a transformer's weights, biases and norms) adding up to ``size``; a model name of
    ``model_shapes.MODELS``: that model's parameter shapes (``size`` is their total)."""
    gen = torch.Generator().manual_seed(0)
    if layout in MODELS:
        sizes = MODELS[layout]()
    elif layout == "4":
        sizes = [size // 4] * 4
    else:
        weights = torch.rand(200, generator=gen) ** 4  # heavy-tailed: mostly small tensors
        sizes = (weights / weights.sum() * size).long().clamp_min(1).tolist()
        sizes[0] += size - sum(sizes)
    params = [torch.randn(n, generator=gen).to(device, dtype).requires_grad_() for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device, dtype) * 1e-3
    return params


def streaming_ceiling_gbs(size: int, repeats: int) -> float:
    """a.add_(b) over ``size`` fp32 elements: 2 reads + 1 write, the best of ``repeats``."""
    a, b = torch.randn(size), torch.randn(size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a.add_(b)
        best = min(best, time.perf_counter() - start)
    return 12 * size / best / 1e9


def cuda_copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10
                            ) -> float:
    """dst.copy_(src) of ``nbytes`` on ``device``: 1 read + 1 write per byte, the median of
    ``repeats`` copies timed with CUDA events after one warm-up copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        start.record()
        dst.copy_(src)
        end.record()
    torch.cuda.synchronize(device)
    return 2 * nbytes / statistics.median(s.elapsed_time(e) / 1e3 for s, e in events) / 1e9


def rotation_copies(size: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many copies of the params and grads each optimizer cycles through: on a CUDA device,
    enough that the smallest step's traffic over all copies spans 3x the L2 cache; 1 on the CPU,
    whose caches are far smaller than any size here."""
    if device.type != "cuda":
        return 1
    param_bytes = torch.finfo(dtype).bits // 8
    per_copy = bytes_per_element(1, param_bytes, param_bytes) * size
    return math.ceil(3 * torch.cuda.get_device_properties(device).L2_cache_size / per_copy)


def time_steps(optimizers: list, count: int, device: torch.device) -> list[float]:
    """Seconds per step of ``count`` steps, cycling through ``optimizers`` (one per copy): wall
    time on the CPU, CUDA events on a CUDA device (all of a step's launches and the gaps between
    them; synchronised once, after the last step)."""
    steps = [optimizers[k % len(optimizers)].step for k in range(count)]
    if device.type != "cuda":
        out = []
        for step in steps:
            start = time.perf_counter()
            step()
            out.append(time.perf_counter() - start)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in steps]
    for step, (start, end) in zip(steps, events):
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _state_tensors(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """id -> tensor of every tensor in ``optimizer.state`` and, beside the params, in its param
    groups (DoG keeps its copy of the initial weights there); an Active(...) wrapper's together
    with its inner optimizer's (their param groups are the same objects: counted once)."""
    found = {id(v): v for state in optimizer.state.values() for v in state.values()
             if isinstance(v, torch.Tensor)}
    for group in optimizer.param_groups:
        for key, value in group.items():
            found.update((id(v), v) for v in (value if isinstance(value, list) else [value])
                         if key != "params" and isinstance(v, torch.Tensor))
    if isinstance(optimizer, Active):
        found.update(_state_tensors(optimizer.optimizer))
    return found


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor of the optimizer's state (per-param scalars included)."""
    return sum(v.nbytes for v in _state_tensors(optimizer).values())


def step_extra_memory(step, device: torch.device = torch.device("cpu")) -> int | None:
    """Peak memory one ``step()`` adds beyond what is already allocated (param-sized
    temporaries, for instance): on a CUDA device from the caching allocator's peak statistics, on
    the CPU from the kernel's high-water mark; None where /proc cannot tell.

    Freed memory is first returned to the OS (malloc_trim) and the high-water mark reset
    (clear_refs 5), so a temporary counts even when the allocator would have recycled pages."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_bytes("VmRSS:")
        step()
        return _proc_status_bytes("VmHWM:") - before
    except OSError:  # not Linux/glibc, or /proc not writable
        return None


def measure(size, layout, dtype, backends, rounds, steps_per_round, device=torch.device("cpu"),
            precisions=BOTH, optimizers=None):
    copies = [make_tensors(size, layout, dtype, device)
              for _ in range(rotation_copies(size, dtype, device))]
    entries = select(contenders(backends, size, precisions), optimizers)
    instances = [[c.make(params) for params in copies] for c in entries]
    times = {c.name: [] for c in entries}
    # warm-up: creates state, first-touch pages, builds caches; on a GPU also compiles kernels
    warmup_steps = 3 if device.type == "cuda" else 1
    for per_copy in instances:
        for opt in per_copy:
            for _ in range(warmup_steps):
                opt.step()
    state = {c.name: state_bytes(per_copy[0]) for c, per_copy in zip(entries, instances)}
    for _ in range(rounds):
        for contender, per_copy in zip(entries, instances):
            times[contender.name] += time_steps(per_copy, steps_per_round, device)
    extra_memory = {c.name: step_extra_memory(per_copy[0].step, device)
                    for c, per_copy in zip(entries, instances)}
    del instances
    return entries, times, state, extra_memory


def quartiles(samples):
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return q[0], statistics.median(samples), q[2]


def size_of(size_name: str) -> int:
    """The param count of a --sizes choice: a synthetic size, or a model's."""
    return param_count(MODELS[size_name]()) if size_name in MODELS else SIZES[size_name]


def memory_needed(size_name, dtype, backends, precisions, optimizers, device) -> int:
    """Bytes a case holds while it runs: its params and grads (every rotation copy) and the
    state of every contender (estimated from the bytes per element; per-step temporaries not
    counted)."""
    size = size_of(size_name)
    param_bytes = torch.finfo(dtype).bits // 8
    entries = select(contenders(backends, size, precisions), optimizers)
    per_element = 2 * param_bytes + sum(c.state_bytes_per_element(param_bytes) for c in entries)
    return rotation_copies(size, dtype, device) * size * per_element


def available_memory(device: torch.device) -> int | None:
    """Free memory of the device (the CPU: MemAvailable of /proc/meminfo; None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run(sizes, layouts, dtypes, rounds, steps_per_round, backends, device=torch.device("cpu"),
        precisions=BOTH, optimizers=None):
    torch.manual_seed(0)
    if device.type == "cuda":
        measure_ceiling = functools.partial(cuda_copy_bandwidth_gbs, device)
        ceiling_name = "Copy bandwidth (dst.copy_(src), 1 read + 1 write per byte)"
    else:
        measure_ceiling = functools.partial(streaming_ceiling_gbs, 25_000_000, 10)
        ceiling_name = "Streaming ceiling (a.add_(b), 12 B/element)"
    # re-measured before every case, the best kept: on a shared machine a single early measurement
    # can catch a busy moment and make every fraction of it meaningless
    ceiling = 0.0
    rows = []
    for size_name in sizes:
        # a model name steps that model's tensors (its own layout) instead of a synthetic size
        size = size_of(size_name)
        for layout in [size_name] if size_name in MODELS else layouts:
            for dtype in dtypes:
                ceiling = max(ceiling, measure_ceiling())
                entries, times, state, extra_memory = measure(
                    size, layout, dtype, backends, rounds, steps_per_round, device, precisions,
                    optimizers)
                medians = {name: statistics.median(t) for name, t in times.items()}
                param_bytes = torch.finfo(dtype).bits // 8
                moved = {c.name: c.bytes_per_element(param_bytes) for c in entries}
                for c in entries:
                    q1, med, q3 = quartiles(times[c.name])
                    rows.append({
                        "size": size_name, "tensors": layout, "dtype": str(dtype).split(".")[-1],
                        "optimizer": c.name, "median_ms": med * 1e3, "q1_ms": q1 * 1e3,
                        "q3_ms": q3 * 1e3, "samples": len(times[c.name]),
                        "bytes_per_element": moved[c.name],
                        "gb_per_s": moved[c.name] * size / med / 1e9,
                        "baseline": c.baseline,
                        "ratio_to_baseline": med / medians[c.baseline] if c.baseline else None,
                        "byte_floor": moved[c.name] / moved[c.baseline] if c.baseline else None,
                        "speedup_over_foreach": (
                            medians[c.foreach_twin] / med if c.foreach_twin else None
                        ),
                        "state_mib": state[c.name] / 2**20,
                        "extra_memory_mib": (None if extra_memory[c.name] is None
                                             else extra_memory[c.name] / 2**20),
                    })
    for row in rows:
        row["fraction_of_ceiling"] = row["gb_per_s"] / ceiling
    return {"ceiling_gb_per_s": ceiling, "ceiling": ceiling_name, "rows": rows}


def markdown(result) -> str:
    lines = [
        f"{result['ceiling']}, the best of its measurements before each case of this run: "
        f"{result['ceiling_gb_per_s']:.1f} GB/s",
        "",
        "B/elem: bytes a mid-epoch step moves per element; byte floor: B/elem over the "
        "baseline's, the ratio a bandwidth-bound step would reach; state MiB: the optimizer's "
        "state after its first step; extra MiB: the peak memory one step adds. Active rows "
        "without \"compact\" or \"bfloat16\" keep full state.",
        "",
        "| size | tensors | dtype | optimizer | median ms | IQR ms | B/elem | GB/s | % ceiling "
        "| vs baseline | byte floor | vs own foreach | state MiB | extra MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio_to_baseline']:.2f}× {r['baseline']}" if r["baseline"] else ""
        floor = f"{r['byte_floor']:.2f}×" if r["baseline"] else ""
        speedup = f"{r['speedup_over_foreach']:.1f}× faster" if r["speedup_over_foreach"] else ""
        extra = "" if r["extra_memory_mib"] is None else f"{r['extra_memory_mib']:.1f}"
        lines.append(
            f"| {r['size']} | {r['tensors']} | {r['dtype']} | {r['optimizer']} | "
            f"{r['median_ms']:.2f} | {r['q1_ms']:.2f}–{r['q3_ms']:.2f} | {r['bytes_per_element']} | "
            f"{r['gb_per_s']:.1f} | {100 * r['fraction_of_ceiling']:.0f}% | {ratio} | {floor} | "
            f"{speedup} | {r['state_mib']:.1f} | {extra} |"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    """The CPU's model name (a timing is meaningless without it: machines differ by session)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _simd_path(device: torch.device) -> str:
    """The SIMD build the cpu backend's kernels run (its ISA lowered to what the CPU has)."""
    if device.type != "cpu" or adaptive_lr.backends.unavailable_reason("cpu", device):
        return "no fused cpu kernels"
    return f"SIMD {torch.ops.adaptive_lr.cpu_capability()}"


def _check_writable(parser: argparse.ArgumentParser, path: str) -> None:
    """--json names a file that can be written (its folders are created now)."""
    if os.path.isdir(path):
        parser.error(f"--json {path}: is a directory, not a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        parser.error(f"--json {path}: cannot create its folder {folder}: {error.strerror}")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        parser.error(f"--json {path}: not writable")


def main(argv=None, prog=None) -> dict:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M", "50M"],
                        choices=list(SIZES) + list(MODELS),
                        help="param counts, or real models' parameter lists (model_shapes.py)")
    parser.add_argument("--layouts", nargs="+", default=["4", "200"], choices=["4", "200"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=None, choices=adaptive_lr.backends.NAMES,
                        help="Active backends to time (default: all available except reference)")
    parser.add_argument("--state-precision", nargs="+", default=["compact"],
                        choices=[*SIGN_BYTES, "both"],
                        help="the Active optimizers' state_precisions, side by side (default: "
                             "compact, theirs; both: full and compact; bfloat16: ActiveSGD and "
                             "ActiveLion only); each adds its Active state to memory")
    parser.add_argument("--optimizers", nargs="+", default=None,
                        choices=[cls.__name__ for cls in _active_optimizers()],
                        help="Active optimizers to time, with the torch steps they are compared "
                             "with (default: every optimizer)")
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--steps-per-round", type=positive_int, default=4)
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="CPU threads (CPU device only)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="write the raw results here")
    args = parser.parse_args(argv)
    # what can be checked before minutes of measuring
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device is available to torch {torch.__version__}")
    device = torch.device(args.device)
    for backend in args.backends or []:
        reason = adaptive_lr.backends.unavailable_reason(backend, device)
        if reason is not None:
            parser.error(f"--backends {backend}: unavailable on {device}: {reason}")
    if args.json:  # checked before minutes of measuring, not after
        _check_writable(parser, args.json)
    torch.set_num_threads(args.threads)
    backends = args.backends or [b for b in adaptive_lr.available_backends(device)
                                 if b != "reference"]
    precisions = tuple(dict.fromkeys(
        precision for name in args.state_precision
        for precision in (BOTH if name == "both" else (name,))))
    dtypes = [getattr(torch, d) for d in args.dtypes]
    # every contender of a case holds its state at once: refuse a case that cannot fit, before
    # minutes of measuring end in the kernel's out-of-memory kill
    available = available_memory(device)
    for size_name in args.sizes:
        needed = max(memory_needed(size_name, dtype, backends, precisions, args.optimizers, device)
                     for dtype in dtypes)
        # room for the steps' temporaries (the foreach backend's: up to 1 GiB at 50M)
        if available is not None and needed > 0.8 * available:
            parser.error(f"--sizes {size_name}: its params, grads and every contender's state "
                         f"need about {needed / 2**30:.1f} GiB, and {device} has "
                         f"{available / 2**30:.1f} GiB free: time fewer at once (--optimizers, "
                         "--state-precision, --backends) or a smaller size")
    result = run(args.sizes, args.layouts, dtypes, args.rounds, args.steps_per_round, backends,
                 device, precisions, args.optimizers)
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "threads": args.threads, "processor": _cpu_model(),
                         "simd": _simd_path(device)}
    if device.type == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name(device)
    machine = result["machine"]
    print(f"{machine['processor']}, {machine['simd']}, {args.threads} threads, torch "
          f"{machine['torch']}\n")
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
