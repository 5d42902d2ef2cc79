"""gain_stats(): what the gains look like, for the native Active optimizers and Active(...) alike
(both keep each param's gain in its state under "gain")."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


class GainStats:
    """The ``gain_stats`` method of an optimizer whose ``state[p]["gain"]`` is param p's gain."""

    @torch.no_grad()
    def gain_stats(self, since: dict | None = None) -> dict[str, dict]:
        """Per param that has state: statistics of its gains, the ones the current epoch's
        steps use (a boundary marked but not yet applied is not in them).

        Keys are the param names (``named_parameters()`` given to the optimizer) or
        ``"<group>.<index>"``. Each entry: ``numel``, ``median``, ``p99``, ``max`` (nearest-rank
        quantiles, as floats), ``gain`` (a copy of the gain tensor), and, when ``since`` is an
        earlier result of this method, ``grew`` / ``shrank``: the fraction of elements whose
        gain is larger / smaller than in ``since`` (one call per epoch: at the last boundary).
        A param with no elements (an FSDP shard may have none) has None quantiles and no
        fractions.
        Reads state only (works on every backend); costs a copy and two selections per param.
        For a sharded (DTensor) param it describes this rank's shard."""
        stats = {}
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names") or [f"{g}.{i}" for i in range(len(group["params"]))]
            for name, p in zip(names, group["params"]):
                # (get: indexing the state, a defaultdict, would add an empty entry for p, which
                # Active(...) would take for a param with state)
                gain = self.state.get(p, {}).get("gain")
                if gain is None:
                    continue
                if isinstance(gain, DTensor):
                    gain = gain.to_local()
                gain = gain.detach().to(torch.float32, copy=True)
                flat = gain.reshape(-1)
                entry = {"numel": flat.numel(), "gain": gain, "median": None, "p99": None,
                         "max": None}
                if flat.numel():  # (an empty param, or an FSDP shard with no elements: None)
                    entry.update(median=_nearest_rank(flat, 0.5), p99=_nearest_rank(flat, 0.99),
                                 max=flat.max().item())
                before = (since or {}).get(name)
                if before is not None and flat.numel():
                    entry["grew"] = (gain > before["gain"]).float().mean().item()
                    entry["shrank"] = (gain < before["gain"]).float().mean().item()
                stats[name] = entry
        return stats


def _nearest_rank(flat: Tensor, q: float) -> float:
    """The q-quantile by nearest rank (torch.quantile refuses tensors over 2**24 elements)."""
    k = max(1, math.ceil(q * flat.numel()))
    return flat.kthvalue(k).values.item()
