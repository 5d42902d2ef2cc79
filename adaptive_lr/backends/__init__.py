"""Backend registry: each backend is a module with ``unavailable_reason(device) -> str | None``
(None when it can run on that device) and ``step(bucket) -> None`` (see ``bucket.py``).
``rescale.PASSES`` names the pass ``Active(optimizer)`` runs on each backend after its inner
optimizer's step."""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from ..gain_rule import GainRule, grad_sq_sum_floor, sign_test_floor
from .bucket import Boundary, Bucket, state_dtype
from .reference import apply_boundary

# Names in order of preference for "auto" (fastest first); "reference" is never auto's choice.
_AUTO_ORDER = {"cpu": ("cpu", "foreach"), "cuda": ("cuda", "triton", "foreach")}
NAMES = ("reference", "foreach", "cpu", "cuda", "triton")
ENV_VARIABLE = "ADAPTIVE_LR_BACKEND"  # overrides "auto"

__all__ = ["Boundary", "Bucket", "GainRule", "NAMES", "apply_boundary", "available_backends",
           "choose", "grad_sq_sum_floor", "resolve", "sign_test_floor", "state_dtype"]


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def unavailable_reason(name: str, device: torch.device) -> str | None:
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + NAMES}")
    return _module(name).unavailable_reason(torch.device(device))


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backends that can step tensors on ``device``, e.g. ``["reference", "foreach", "cpu"]``."""
    return [n for n in NAMES if unavailable_reason(n, device) is None]


_warned_fallback: set[str] = set()


def _step_meta(bucket: Bucket) -> None:
    """Any backend's step on meta tensors (as torch's optimizers step them: shapes only)."""


def choose(name: str, device: torch.device) -> str:
    """The backend that steps tensors on ``device`` for backend ``name``: ``name`` itself, or
    for ``"auto"`` (or the ``ADAPTIVE_LR_BACKEND`` environment variable, which overrides it) the
    fastest available; an explicitly named backend that cannot run raises instead of falling
    back."""
    device = torch.device(device)
    chosen_by = ""
    if name == "auto" and os.environ.get(ENV_VARIABLE):  # set but empty: as if unset
        name, chosen_by = os.environ[ENV_VARIABLE], f" (chosen by {ENV_VARIABLE})"
        if name not in ("auto",) + NAMES:
            raise ValueError(f"{ENV_VARIABLE}={name!r} is no adaptive_lr backend; choose one of "
                             f"{', '.join(('auto',) + NAMES)}")
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise RuntimeError(
                f"adaptive_lr backend {name!r}{chosen_by} is unavailable on {device}: {reason}")
        return name
    preferred = _AUTO_ORDER.get(device.type, ("foreach",))
    for candidate in preferred:
        if unavailable_reason(candidate, device) is None:
            if candidate != preferred[0] and device.type not in _warned_fallback:
                _warned_fallback.add(device.type)
                why = unavailable_reason(preferred[0], device)
                warnings.warn(
                    f"adaptive_lr: the fused {preferred[0]!r} backend is unavailable ({why}); "
                    f"using {candidate!r}, which is much slower",
                    stacklevel=4,
                )
            return candidate
    return "foreach"


def resolve(name: str, device: torch.device):
    """The ``step`` function of the backend ``choose(name, device)`` names."""
    # meta tensors have shapes without values: state is created, nothing is computed
    if torch.device(device).type == "meta":
        return _step_meta
    return _module(choose(name, device)).step
