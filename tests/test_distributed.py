"""Active optimizers under torch.distributed, on 2 CPU ranks (gloo, loopback): DDP keeps every
rank identical, and FSDP2 (fully_shard) steps the local shards and resumes exactly from a
sharded torch.distributed.checkpoint."""

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from adaptive_lr import ActiveAdamW, GreedyLR
from doc_examples import example
from gloo_ranks import WORLD, requires_gloo, run_ranks

pytestmark = requires_gloo

STEPS_PER_EPOCH = 3
# a Linear(16, 1) weight has one row: under FSDP2 one rank's shard of it is empty
SIZES = (8, 16, 1)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(*SIZES[:2]), torch.nn.Tanh(), torch.nn.Linear(*SIZES[1:]))


# the paper's rule: the gains must move within the tests' short epochs (the default sign test may
# hold them all)
PAPER_RULE = {"sign_threshold": 0.0}


def _optimizer(model):
    """Unsharded, as the doc example's ``shard`` builds it, with the paper's rule (PAPER_RULE)."""
    return ActiveAdamW(model.parameters(), lr=torch.tensor(1e-3), steps_per_epoch=STEPS_PER_EPOCH,
                       **PAPER_RULE)


def _train(model, opt, steps, seed, rank=0, sched=None):
    """``steps`` steps on seeded data (rank-dependent targets when ``rank`` differs); returns the
    local losses and the lrs after each step."""
    data = torch.Generator().manual_seed(seed)
    losses, lrs = [], []
    for _ in range(steps):
        x = torch.randn(16, SIZES[0], generator=data)
        y = torch.sin(x.sum(1, keepdim=True)) * (1 + rank)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step(loss.detach())
        losses.append(loss.item())
        lrs.append(opt.param_groups[0]["lr"].item())
    return losses, lrs


# ---- DDP ----------------------------------------------------------------------------------

def _ddp_rank(rank, out_dir):
    model = DistributedDataParallel(_model())
    opt = _optimizer(model)
    sched = GreedyLR(opt, patience=1, factor=0.7)
    losses, lrs = _train(model, opt, 6 * STEPS_PER_EPOCH, seed=rank, rank=rank, sched=sched)
    torch.save({
        "losses": losses,
        "lrs": lrs,
        "params": [p.detach() for p in model.parameters()],
        "gains": [opt.state[p]["gain"] for p in model.parameters()],
    }, f"{out_dir}/ddp{rank}.pt")


def test_ddp_ranks_stay_identical_with_different_losses(tmp_path):
    run_ranks(_ddp_rank, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank saw its own data
    assert ranks[0]["lrs"] == ranks[1]["lrs"]  # GreedyLR averaged the losses over the ranks
    assert len(set(ranks[0]["lrs"])) > 2  # and moved the lr
    for key in ("params", "gains"):
        for t0, t1 in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(t0, t1), key
    assert any((g != 1).any() for g in ranks[0]["gains"])  # six epochs: the gains moved


# ---- FSDP2: the example of docs/integration.md ---------------------------------------------

def _full(tensors):
    return [t.full_tensor() for t in tensors]


def _fsdp_rank(rank, out_dir):
    fsdp2 = example("fsdp2")
    model = _model()
    opt = fsdp2["shard"](model, STEPS_PER_EPOCH)
    opt.param_groups[0].update(PAPER_RULE)
    _train(model, opt, 4, seed=1)  # the same data on every rank: comparable to one process

    for p in model.parameters():  # the state lives on the local shards, sharded like its param
        for key, value in opt.state[p].items():
            if key not in ("step", "epoch", "has_prev_sign", "rounding_seed"):  # 0-dim
                assert isinstance(value, DTensor) and value.placements == p.placements, key
                assert value.to_local().shape == p.to_local().shape, key

    weight = next(model.parameters())  # a grad sharded unlike its param is refused, nothing moves
    before = weight.to_local().clone()
    weight.grad = distribute_tensor(torch.ones(weight.shape), weight.device_mesh, [Replicate()])
    with pytest.raises(RuntimeError, match="must be sharded like it"):
        opt.step()
    assert torch.equal(weight.to_local(), before) and opt.param_groups[0]["steps_in_epoch"] == 1
    opt.zero_grad()

    checkpoint = f"{out_dir}/fsdp_checkpoint"
    fsdp2["save"](model, opt, checkpoint)
    restored_model = _model()
    restored_opt = fsdp2["shard"](restored_model, STEPS_PER_EPOCH)
    fsdp2["load"](restored_model, restored_opt, checkpoint)

    results = {}
    for name, (m, o) in {"trained": (model, opt), "restored": (restored_model, restored_opt)}.items():
        _train(m, o, 5, seed=2)  # resumes mid-epoch and crosses two boundaries
        results[name] = {"params": _full(m.parameters()),
                         "gains": _full(o.state[p]["gain"] for p in m.parameters())}
    torch.save(results, f"{out_dir}/fsdp{rank}.pt")


def test_fsdp2_steps_local_shards_and_resumes_from_a_sharded_checkpoint(tmp_path):
    run_ranks(_fsdp_rank, tmp_path, str(tmp_path))
    model = _model()
    opt = _optimizer(model)
    _train(model, opt, 4, seed=1)
    _train(model, opt, 5, seed=2)
    expected = {"params": list(model.parameters()), "gains": [opt.state[p]["gain"] for p in model.parameters()]}
    assert any((g != 1).any() for g in expected["gains"])
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"fsdp{rank}.pt")
        for run in ("trained", "restored"):
            for key, tensors in expected.items():
                for actual, wanted in zip(results[run][key], tensors):
                    assert torch.equal(actual, wanted.detach()), (rank, run, key)
