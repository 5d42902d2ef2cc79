"""The short workload scripts/gpu_check.sh runs under compute-sanitizer: every Active optimizer
on every fused backend of the device steps a few tensors across epoch boundaries
(steps_per_epoch=2 over 6 steps: no boundary, ROLL and UPDATE), the last step an overflow step
(found_inf set) with a boundary due. Tensors: a multi-chunk one, a tiny one, an empty one and a
misaligned view, in float32 and bfloat16. Prints one line per (backend, optimizer) and exits
non-zero when a fused backend is unavailable.

    python3 scripts/gpu_sanitize_steps.py [cuda|cpu]   (cpu: the dry run's check of this script)
"""

import sys

import torch

from adaptive_lr import ActiveAdaBelief, ActiveAdamW, ActiveRAdam, ActiveSGD, available_backends

OPTIMIZERS = [(ActiveSGD, dict(momentum=0.9, nesterov=True)), (ActiveAdamW, dict(amsgrad=True)),
              (ActiveRAdam, {}), (ActiveAdaBelief, dict(amsgrad=True))]
FUSED = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def make_params(device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(70_001, device=device, generator=gen).to(dtype)
    tensors = [base[1:].clone(), torch.randn(3, device=device).to(dtype),
               torch.empty(0, device=device, dtype=dtype), base[1:4097]]  # the last: misaligned
    return [t.requires_grad_() for t in tensors]


def run(device, backend):
    for cls, kwargs in OPTIMIZERS:
        for dtype in (torch.float32, torch.bfloat16):
            params = make_params(device, dtype)
            opt = cls(params, lr=torch.tensor(1e-3, device=device), steps_per_epoch=2,
                      backend=backend, **kwargs)
            for step in range(6):
                for p in params:
                    p.grad = torch.randn_like(p)
                if step == 5:  # an overflow step with a boundary due, as GradScaler hands it over
                    opt.grad_scale = torch.full((1,), 2.0, device=device)
                    opt.found_inf = torch.ones(1, device=device)
                opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"{backend} {cls.__name__}: 6 steps each in float32 and bfloat16", flush=True)


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    available = available_backends(device)
    for name in FUSED[device]:
        if name in available:
            run(device, name)
    missing = sorted(set(FUSED[device]) - set(available))
    if missing:
        sys.exit(f"not available on {device}, not stepped: {missing}")
