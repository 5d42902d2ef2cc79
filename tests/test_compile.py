"""torch.compile: a compiled training step equals the eager one (on the cpu backend, and on the
cuda and triton backends where a CUDA device is present), an lr that GreedyLR changes in place
recompiles nothing, and the fused cpu step is one opaque custom-op call per bucket."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from adaptive_lr import ActiveAdamW, GreedyLR
from optim_configs import CONFIGS, device_backends

# Each Active optimizer with its defaults.
DEFAULT_CONFIGS = [config for config in CONFIGS if not config.kwargs]
ADAMW = next(config for config in DEFAULT_CONFIGS if config.cls is ActiveAdamW)
# With steps_per_epoch=3, steps 1, 4 and 7 are a first step, a ROLL and an UPDATE boundary: by
# then every kind of step has been compiled once.
WARMUP = 7
STEPS = 16


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(config, backend, compile_with=None, device="cpu"):
    """STEPS training steps of a small model, GreedyLR fed the loss (patience=0 moves the 0-dim
    tensor lr at almost every step); the whole step (forward, backward, opt.step) is compiled
    with ``compile_with`` when given. Returns the model, the optimizer, the compiled frame count
    after each step and the lrs seen."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model.to(device)
    x, y = torch.randn(32, 8).to(device), torch.randn(32, 1).to(device)
    opt = config.make(model.parameters(), lr=torch.tensor(1e-2, device=device), backend=backend)
    sched = GreedyLR(opt, patience=0, factor=0.5, max_lr=1.0)

    def train_step():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    counter = CompileCounterWithBackend(compile_with) if compile_with else None
    run_step = torch.compile(train_step, backend=counter) if counter else train_step
    frames, lrs = [], []
    for _ in range(STEPS):
        sched.step(run_step().detach())
        frames.append(counter.frame_count if counter else 0)
        lrs.append(opt.param_groups[0]["lr"].item())
    return model, opt, frames, lrs


def _assert_same_run(eager, compiled):
    (model_e, opt_e, _, lrs_e), (model_c, opt_c, _, lrs_c) = eager, compiled
    assert lrs_c == lrs_e
    for p_e, p_c in zip(model_e.parameters(), model_c.parameters()):
        assert torch.equal(p_c, p_e)
        for key, value in opt_e.state[p_e].items():
            assert not torch.is_tensor(value) or torch.equal(opt_c.state[p_c][key], value), key
    assert opt_c.param_groups[0]["epoch"] == opt_e.param_groups[0]["epoch"] == STEPS // 3


def _assert_no_recompile_after_warmup(frames, lrs):
    assert len(set(lrs[WARMUP:])) >= 4, lrs  # GreedyLR really moved the lr after the warm-up
    assert frames[-1] == frames[WARMUP - 1], frames


# the fused backends: cpu on the CPU; cuda and triton on a CUDA device (triton only where it is
# compiled for the GPU, not under the CPU interpreter)
FUSED = [param for param in device_backends(only=("cpu", "cuda", "triton"))
         if param.values[0] == "cuda" or param.values[1] == "cpu"]


@pytest.mark.parametrize(("device", "backend"), FUSED)
@pytest.mark.parametrize("config", DEFAULT_CONFIGS, ids=lambda c: c.cls.__name__)
def test_compiled_training_step_matches_eager_without_recompiles(config, device, backend):
    """aot_eager traces forward, backward and step through AOTAutograd's functionalization (the
    path of inductor) but runs ATen eagerly, so the results are bit for bit those of eager."""
    eager = _train(config, backend, device=device)
    compiled = _train(config, backend, compile_with="aot_eager", device=device)
    _assert_same_run(eager, compiled)
    _assert_no_recompile_after_warmup(compiled[2], compiled[3])


@pytest.mark.parametrize("backend", ["foreach", "reference"])
def test_compiled_portable_backends_match_eager_without_recompiles(backend):
    """They read step counts on the host (graph breaks) but still compile and match. Dynamo
    rewrites Tensor.addcmul_(value=) (the reference's second moment) as mul + fma, which rounds
    differently in the last bit; without that rewrite the compiled step is exact."""
    eager = _train(ADAMW, backend)
    with torch._dynamo.config.patch(enable_dynamo_decompositions=False):
        compiled = _train(ADAMW, backend, compile_with="eager")
    _assert_same_run(eager, compiled)
    _assert_no_recompile_after_warmup(compiled[2], compiled[3])


def _compiled_graphs(step):
    """Run ``step`` compiled; return the FX graphs dynamo captured."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    torch.compile(step, backend=record)()
    return graphs


def _is_fused_op(node):
    return node.op == "call_function" and str(node.target).startswith("adaptive_lr.")


def test_fused_step_is_one_custom_op_call_per_bucket():
    # two buckets: the float32 params and the float64 param
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(5, dtype=torch.float64, requires_grad=True),
              torch.randn(2, requires_grad=True)]
    opt = ADAMW.make(params, lr=torch.tensor(1e-2), backend="cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state exists: the compiled step below is a steady-state one
    (graph,) = _compiled_graphs(opt.step)  # one graph: the bookkeeping's breaks split no ops
    calls = [node for node in graph.nodes if node.op == "call_function"]
    assert len(calls) == 2 and all(_is_fused_op(node) for node in calls), graph
    assert sorted(len(node.kwargs["params"]) for node in calls) == [1, 2]


def test_compiled_step_with_inductor_matches_eager():
    """The default torch.compile backend: inductor keeps the op as an opaque extern call."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        opt = ADAMW.make(model.parameters(), lr=torch.tensor(1e-2), backend="cpu")
        sched = GreedyLR(opt, patience=0, factor=0.5, max_lr=1.0)
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(WARMUP + 2):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            step()
            sched.step(loss.detach())
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*results):
        assert torch.equal(compiled, eager)
