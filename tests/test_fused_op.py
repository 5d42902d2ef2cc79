"""torch.ops.adaptive_lr.active_step_ called directly: the kernels no Bucket names yet (adam, lion)
against a float64 transcription of their update (Lion's sign test on the epoch's sum of g**2 in
float32, as specified), and the op's own argument checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from adaptive_lr.backends import cpu
from adaptive_lr.backends.bucket import Boundary

_REASON = cpu.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"fused cpu backend: {_REASON}")

OP = torch.ops.adaptive_lr.active_step_.default
GAIN_RULE = dict(gain_inc=2.0, gain_dec=0.5, min_gain=0.0, max_gain=3.0, sign_threshold=0.0,
                 relax_gains=False, epoch_steps=3)
SIZES = (1, 17, 300)  # a lone element, SIMD groups plus a tail
SCHEDULE = (Boundary.ROLL, Boundary.NONE, Boundary.UPDATE, Boundary.NONE, Boundary.UPDATE)


def num_states(kernel, hyper):
    if kernel == "lion":
        return 1
    return 3 if hyper[3] else 2  # adam: exp_avg, exp_avg_sq, max_exp_avg_sq with amsgrad


def make_args(kernel, hyper, dtype, weight_decay=0.0, maximize=False, sign_threshold=0.0,
              relax_gains=False, gain_dec=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(n, dt=dtype):
        return torch.randn(n, generator=gen, dtype=torch.float64).to(dt)

    states = []
    for k in range(num_states(kernel, hyper)):
        # second moments are non-negative; Lion's momentum has zeros where its grads are zero
        states += [randn(n, state_dtype).abs() if k else randn(n, state_dtype) for n in SIZES]
    for t in states[: len(SIZES)]:
        t[::5] = 0
    grad_sums = [randn(n, torch.float32) for n in SIZES]
    for t in grad_sums:
        t[::7] = 0  # sign 0: the gain decreases
    args = dict(
        kernel=kernel,
        params=[randn(n) for n in SIZES],
        grads=[randn(n) for n in SIZES],
        gains=[torch.rand(n, generator=gen) * 2 + 0.25 for n in SIZES],
        grad_sums=grad_sums,
        prev_signs=[torch.randint(-1, 2, (n,), generator=gen, dtype=torch.int8) for n in SIZES],
        steps=[torch.tensor(3.0 * i) for i in range(len(SIZES))],
        states=states,
        lr=torch.tensor(1e-2, dtype=torch.float64),
        hyper=hyper,
        weight_decay=weight_decay,
        maximize=maximize,
        boundary=int(Boundary.NONE),
        grad_scale=None,
        found_inf=None,
        **dict(GAIN_RULE, sign_threshold=sign_threshold, relax_gains=relax_gains,
               gain_dec=gain_dec),
    )
    # lion's sign test reads the epoch's sum of g**2 (drawn last: the other tensors stay as they were)
    keeps_q = kernel == "lion" and sign_threshold > 0
    args["grad_sq_sums"] = [randn(n, torch.float32) ** 2 * 3 for n in SIZES] if keeps_q else []
    return args


def transcription(a: dict) -> None:
    """One step of a.kernel in float64, element by element as docs/algorithm.md and the papers
    write it (torch.optim.Adam; lion-pytorch), written back into a's tensors."""
    n = len(a["params"])
    lr = float(a["lr"])
    for i in range(n):
        p = a["params"][i].double()
        g = -a["grads"][i].double() if a["maximize"] else a["grads"][i].double()
        gain, gsum = a["gains"][i].double(), a["grad_sums"][i].double()
        prev = a["prev_signs"][i].double()
        k = a["sign_threshold"]
        if a["boundary"] != Boundary.NONE:
            sign = torch.sign(gsum)
            if k > 0 and a["grad_sq_sums"]:  # the sign test of lion, against Q
                sign = torch.where(gsum * gsum > k * k * a["grad_sq_sums"][i].double(), sign, 0)
                a["grad_sq_sums"][i].zero_()
            elif k > 0:  # the sign test, against v before this step (float64 division: 0 -> inf)
                v = a["states"][n + i].double()
                bc2 = 1 - torch.tensor(a["hyper"][1], dtype=torch.float64) ** float(a["steps"][i])
                sign = torch.where(gsum * gsum > k * k * a["epoch_steps"] / bc2 * v, sign, 0)
            product = prev * sign
            if a["boundary"] == Boundary.UPDATE:
                held = (product == 0) & (k > 0)
                kept = gain  # a held gain, or with relax_gains one above 1 moved toward 1
                if a["relax_gains"]:  # in float32, each op rounded once
                    g32 = gain.float()
                    kept = torch.where(g32 > 1, (g32 - 1) * a["gain_dec"] + 1, g32).double()
                # the kernels take gain_dec as a float32 (exact for 0.5, not for 0.7)
                gain_dec = float(torch.tensor(a["gain_dec"], dtype=torch.float32))
                gain = torch.where(product > 0, gain + a["gain_inc"],
                                   torch.where(held, kept, gain * gain_dec))
                gain = gain.float().double().clamp(a["min_gain"], a["max_gain"])
            prev, gsum = sign, torch.zeros_like(gsum)
        gsum = gsum + g.float().double()
        if a["grad_sq_sums"]:  # float32, the product and the sum each rounded once
            a["grad_sq_sums"][i].add_(g.float() * g.float())
        t = float(a["steps"][i]) + 1
        p = p * (1 - lr * a["weight_decay"])
        st = [a["states"][k * n + i].double() for k in range(len(a["states"]) // n)]
        if a["kernel"] == "adam":
            beta1, beta2, eps, amsgrad, l2 = a["hyper"]
            g_eff = g + l2 * p
            st[0] = beta1 * st[0] + (1 - beta1) * g_eff
            st[1] = beta2 * st[1] + (1 - beta2) * g_eff * g_eff
            if amsgrad:
                st[2] = torch.maximum(st[2], st[1])
            second = st[2] if amsgrad else st[1]
            denom = second.sqrt() / math.sqrt(1 - beta2**t) + eps
            p = p - lr * gain * (st[0] / (1 - beta1**t)) / denom
        else:  # lion
            beta1, beta2 = a["hyper"]
            p = p - lr * gain * torch.sign(beta1 * st[0] + (1 - beta1) * g)
            st[0] = beta2 * st[0] + (1 - beta2) * g
        for target, value in [(a["params"][i], p), (a["gains"][i], gain),
                              (a["grad_sums"][i], gsum), (a["prev_signs"][i], prev)]:
            target.copy_(value)
        for k, value in enumerate(st):
            a["states"][k * n + i].copy_(value)
        a["steps"][i].fill_(t)


def run(step, args, grads):
    for boundary, step_grads in zip(SCHEDULE, grads):
        for g, new in zip(args["grads"], step_grads):
            g.copy_(new)
        args["boundary"] = int(boundary)
        step(args)


def tensor_lists(args):
    return {k: v for k, v in args.items() if isinstance(v, list) and k != "hyper"}


CASES = {
    "adam": ("adam", [0.9, 0.999, 1e-8, 0.0, 0.1], {}),
    "adam-amsgrad-maximize": ("adam", [0.8, 0.99, 1e-6, 1.0, 0.05], dict(maximize=True)),
    "adam-sign-test": ("adam", [0.9, 0.5, 1e-8, 1.0, 0.1], dict(sign_threshold=0.7)),
    "lion": ("lion", [0.9, 0.99], dict(weight_decay=0.1)),
    "lion-maximize": ("lion", [0.95, 0.98], dict(maximize=True)),
    "lion-sign-test": ("lion", [0.9, 0.99], dict(sign_threshold=0.5, maximize=True)),
    "lion-sign-test-relax": ("lion", [0.9, 0.99], dict(sign_threshold=0.5, relax_gains=True,
                                                       gain_dec=0.7)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_new_kernels_match_a_float64_transcription(case, dtype):
    kernel, hyper, options = CASES[case]
    args = make_args(kernel, hyper, dtype, **options)
    expected = make_args(kernel, hyper, torch.float64, **options)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]
             for _ in SCHEDULE]
    for step_grads in grads:
        step_grads[1][::4] = 0  # Lion: zero momentum and zero gradient give sign(0) = 0
    run(lambda a: OP(**a), args, [[g.to(dtype) for g in gs] for gs in grads])
    run(transcription, expected, grads)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for key, values in tensor_lists(expected).items():
        for i, (x, y) in enumerate(zip(tensor_lists(args)[key], values)):
            torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=rtol,
                                       msg=f"{case} {key}[{i}]")
    # the gains moved, so the boundaries were really exercised
    start = make_args(kernel, hyper, dtype, **options)["gains"][2]
    assert not torch.equal(args["gains"][2], start)
    if options.get("sign_threshold"):  # and the sign test held some gains and moved others
        assert (args["prev_signs"][2] == 0).any() and (args["prev_signs"][2] != 0).any()


@pytest.mark.parametrize("case", list(CASES))
def test_new_kernels_pass_opcheck(case):
    kernel, hyper, options = CASES[case]
    args = make_args(kernel, hyper, torch.float32, **options)
    args["boundary"] = int(Boundary.UPDATE)
    torch.library.opcheck(OP, (), args)


BAD_ARGS = {
    "unknown kernel": (dict(kernel="adamax"), r"unknown kernel 'adamax'; the kernels are "
                       r"sgd adamw radam adabelief adam lion"),
    "hyper count": (dict(hyper=[0.9, 0.999, 1e-8, 0.0]), r"adam takes 5 hyperparameters "
                    r"\(beta1, beta2, eps, amsgrad, weight_decay\), got 4"),
    "beta": (dict(hyper=[0.9, 1.0, 1e-8, 0.0, 0.1]), r"adam's beta2 must be in \[0, 1\), got 1"),
    "flag": (dict(hyper=[0.9, 0.999, 1e-8, 0.5, 0.1]), r"adam's amsgrad must be 0 or 1 \(a flag\)"),
    "l2": (dict(hyper=[0.9, 0.999, 1e-8, 0.0, -1.0]), r"adam's weight_decay must be >= 0"),
    "sign_threshold": (dict(sign_threshold=-1.0), r"sign_threshold must be finite and >= 0"),
    "epoch_steps": (dict(epoch_steps=-1), r"epoch_steps must be >= 0"),
    "relax_gains": (dict(relax_gains=True), r"relax_gains needs the sign test"),
    "state count": (dict(hyper=[0.9, 0.999, 1e-8, 1.0, 0.1]),
                    r"adam with these hyperparameters keeps 3 states per param \(exp_avg, "
                    r"exp_avg_sq, max_exp_avg_sq\), so states must hold 3 \* 3 = 9 tensors"),
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bad_arguments_raise_and_change_nothing(name):
    changes, message = BAD_ARGS[name]
    args = make_args("adam", [0.9, 0.999, 1e-8, 0.0, 0.1], torch.float32)
    args["boundary"] = int(Boundary.UPDATE)
    before = copy.deepcopy(tensor_lists(args))
    with pytest.raises(RuntimeError, match=message):
        OP(**dict(args, **changes))
    for key, values in before.items():
        for x, y in zip(tensor_lists(args)[key], values):
            assert torch.equal(x, y), key


def test_grad_sq_sums_are_taken_exactly_where_the_sign_test_reads_them():
    lion = make_args("lion", [0.9, 0.99], torch.float32, sign_threshold=1.0)
    with pytest.raises(RuntimeError, match=r"kernel 'lion' with sign_threshold 1 takes 3 "
                                           r"grad_sq_sums .*, got 0"):
        OP(**dict(lion, grad_sq_sums=[]))
    with pytest.raises(RuntimeError, match=r"grad_sq_sums\[1\] must have dtype Float"):
        OP(**dict(lion, grad_sq_sums=[q.double() if i == 1 else q
                                      for i, q in enumerate(lion["grad_sq_sums"])]))
    adam = make_args("adam", [0.9, 0.999, 1e-8, 0.0, 0.1], torch.float32, sign_threshold=1.0)
    with pytest.raises(RuntimeError, match=r"kernel 'adam' with sign_threshold 1 takes 0"):
        OP(**dict(adam, grad_sq_sums=lion["grad_sq_sums"]))


def test_state_errors_name_the_state():
    args = make_args("lion", [0.9, 0.99], torch.float32)
    args["states"][-1] = args["states"][-1].double()
    with pytest.raises(RuntimeError, match=r"exp_avg\[2\] must have dtype Float"):
        OP(**args)
