"""Short runs: the sign window on a byte-level language model (docs/RESULTS.md §6, issue 22).

ActiveLR compares each element's summed gradient over a window of steps with the previous
window's; with the window an epoch, gains first change in the third epoch, so a one-epoch run
never changes one. This study trains a small causal GPT on bytes of the Python standard library's
own source (no download) for one epoch, with windows shorter than the epoch
(``steps_per_epoch`` = the window), and fine-tunes a pretrained one on the stdlib's tests.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import sysconfig
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from adaptive_lr.study import lr_sweep, runner
from adaptive_lr.study.digits import Digits, train
from adaptive_lr.study.robustness import ANCHORS, make_anchor

VOCAB = 256  # bytes
# at most this many bytes of each file (its head), so that a budget spans many files: a 64 KiB
# validation budget would otherwise be one or two large modules
FILE_BYTES = 16 * 1024

# ------------------------------------------------------------------------------------- data


class Split(NamedTuple):
    """Bytes of one corpus cut into a training and a validation stream, by file."""

    train: bytes
    validation: bytes
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]


def corpus_files(corpus: str) -> list[str]:
    """The sorted file names (relative to the stdlib directory) of a corpus: "stdlib", its
    top-level modules; "tests", its regression-test modules (test/test_*.py)."""
    root = sysconfig.get_paths()["stdlib"]
    folder, prefix = {"stdlib": ("", ""), "tests": ("test", "test_")}[corpus]
    return sorted(os.path.join(folder, name) for name in os.listdir(os.path.join(root, folder))
                  if name.startswith(prefix) and name.endswith(".py"))


def _fill(names: list[str], budget: int, root: str) -> tuple[bytes, list[str]]:
    """The first FILE_BYTES of each file of ``names`` in order, up to ``budget`` bytes."""
    out, used = bytearray(), []
    for name in names:
        if len(out) >= budget:
            break
        with open(os.path.join(root, name), "rb") as f:
            out += f.read(FILE_BYTES)
        used.append(name)
    return bytes(out[:budget]), used


def split(names: list[str], train_bytes: int, validation_bytes: int, root: str) -> Split:
    """Files in the order of the SHA-256 of their names (a fixed shuffle of the sorted list, so
    that a budget takes files from the whole alphabet): the first files fill the validation
    budget, the following ones the training budget; no file is in both."""
    order = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    validation, validation_files = _fill(order, validation_bytes, root)
    train, train_files = _fill(order[len(validation_files):], train_bytes, root)
    if len(validation) < validation_bytes or len(train) < train_bytes:
        raise ValueError(f"the corpus has fewer than {train_bytes} + {validation_bytes} bytes")
    return Split(train, validation, tuple(train_files), tuple(validation_files))


@functools.lru_cache(maxsize=4)
def load_split(corpus: str, train_bytes: int, validation_bytes: int) -> Split:
    return split(corpus_files(corpus), train_bytes, validation_bytes,
                 sysconfig.get_paths()["stdlib"])


def sequences(stream: bytes, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, (n, context) each, from non-overlapping windows of the
    stream (the last byte of one window is the first target's context in the next)."""
    n = (len(stream) - 1) // context
    data = torch.frombuffer(bytearray(stream[:n * context + 1]), dtype=torch.uint8).long()
    return data[:-1].view(n, context), data[1:].view(n, context)


def as_task_data(data: Split, context: int) -> Digits:
    """The (x, y) tensors the shared training loop takes: every position is a prediction."""
    return Digits(*sequences(data.train, context), *sequences(data.validation, context))


def unigram_loss(train: torch.Tensor, targets: torch.Tensor) -> float:
    """Cross-entropy, nats per byte, of ``targets`` under the byte frequencies of ``train``
    with add-one smoothing (a byte never seen in training has a finite loss)."""
    counts = torch.bincount(train.flatten(), minlength=VOCAB).double() + 1
    log_p = counts.log() - counts.sum().log()
    return -log_p[targets.flatten()].mean().item()


def fingerprint(data: Split) -> dict:
    """What makes a run reproducible elsewhere: the files used and a hash of their bytes."""
    names = "\n".join(data.validation_files + ("",) + data.train_files).encode()
    return {"files_sha256": hashlib.sha256(names).hexdigest()[:16],
            "bytes_sha256": hashlib.sha256(data.validation + data.train).hexdigest()[:16],
            "train_files": len(data.train_files),
            "validation_files": len(data.validation_files)}


# ------------------------------------------------------------------------------------ model


class Block(nn.Module):
    """Pre-norm: x + attention(LN(x)), then x + MLP(LN(x)) (GELU, hidden 4 × width)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class GPT(nn.Module):
    """A causal byte-level transformer: byte and learned position embeddings, pre-norm blocks,
    a final LayerNorm, and a read-out tied to the byte embedding (as GPT-2)."""

    def __init__(self, width: int, layers: int, heads: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        # GPT-2's initialisation: N(0, 0.02), the residual projections scaled by 1/sqrt(2·layers)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) \
                    else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x):
        h = self.embed(x) + self.position[:x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.norm(h) @ self.embed.weight.T


def parameters(width: int, layers: int, heads: int, context: int) -> int:
    return sum(p.numel() for p in GPT(width, layers, heads, context).parameters())


def loss_on(model: nn.Module, data: Digits) -> float:
    """Mean next-byte cross-entropy (nats per byte) on the validation sequences."""
    with torch.no_grad():
        logits = model(data.x_test)
    return F.cross_entropy(logits.reshape(-1, VOCAB), data.y_test.reshape(-1)).item()


# ------------------------------------------------------------------------------- optimizers

ADAMW_DEFAULT_LR = 1e-3  # torch's; the plot's x axis is lr / the method's default lr
GAIN_INC = 2.0  # the library's default, and the "fixed" rule
_ACTIVE = re.compile(r"W([1-9][0-9]*|epoch)(-scaled|-paper)?")


def variant(label: str) -> str:
    """A method of the study (an argparse type: a ValueError names the bad label): "AdamW",
    "Prodigy", "SF-AdamW" (at their defaults but the lr), or ActiveAdamW as "W<steps>" (its sign
    window: ``steps_per_epoch=steps``) or "Wepoch" (the data's epoch), with the sign test k = 2
    and gain_inc 2; "W<steps>-scaled": gain_inc 2 × steps / the epoch's steps; "W<steps>-paper":
    the paper's rule (``sign_threshold=0``)."""
    match = _ACTIVE.fullmatch(label)
    # Wepoch-scaled would be Wepoch (gain_inc 2 × 1)
    if label in ("AdamW", *ANCHORS) or match and match.groups() != ("epoch", "-scaled"):
        return label
    raise ValueError(f"not a variant: {label!r}")


def window_rule(label: str) -> tuple[int | None, bool, bool] | None:
    """(window in steps or None for the epoch, gain_inc scaled, paper rule) of an ActiveAdamW
    variant; None for AdamW and the anchors."""
    match = _ACTIVE.fullmatch(label)
    if match is None:
        return None
    steps, rule = match.groups()
    return None if steps == "epoch" else int(steps), rule == "-scaled", rule == "-paper"


def make_optimizer(label: str, lr: float, params, steps_per_epoch: int):
    if label in ANCHORS:
        return make_anchor(label, params, lr)
    rule = window_rule(label)
    if rule is None:
        return lr_sweep.make_optimizer("AdamW", False, params, lr, steps_per_epoch)
    window, scaled, paper = rule
    window = window or steps_per_epoch
    # the shipped default state (the older studies keep full state to reproduce their numbers)
    options = dict(state_precision="compact")
    if scaled:
        options["gain_inc"] = GAIN_INC * window / steps_per_epoch
    if paper:
        options["sign_threshold"] = 0.0
    return lr_sweep.make_optimizer("AdamW", True, params, lr, window, **options)


# ------------------------------------------------------------------------------------- runs

PHASES = ("pretrain", "finetune", "width")
CORPUS = {"pretrain": "stdlib", "width": "stdlib", "finetune": "tests"}
VARIANTS = ("AdamW", "W25", "W50", "W100", "W250", "Wepoch", "W25-scaled", "W50-scaled",
            "W100-scaled", "W250-scaled", "W50-paper", "Prodigy", "SF-AdamW")


@dataclass(frozen=True)
class LMConfig:
    width: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128
    batch_size: int = 8
    steps: int = 600  # the pretraining epoch
    validation_sequences: int = 512
    finetune_steps: int = 128  # per fine-tuning epoch
    finetune_epochs: int = 3
    heldout_width: int = 160
    variants: tuple[str, ...] = VARIANTS
    lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    anchor_multipliers: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)  # × the anchor's default
    seeds: int = 3
    phases: tuple[str, ...] = PHASES


QUICK = LMConfig(width=32, layers=1, heads=2, context=32, steps=64, validation_sequences=64,
                 finetune_steps=8, heldout_width=16,
                 variants=("AdamW", "W4", "W4-scaled", "W4-paper", "Wepoch", "Prodigy",
                           "SF-AdamW"),
                 lrs=(1e-3, 1e-2), anchor_multipliers=(1.0,), seeds=1)


def settings(config: LMConfig, phase: str, init: str = "") -> dict:
    """A phase's run settings but the optimizer's; ``init``: the fine-tune's checkpoint file."""
    sequences = config.finetune_steps if phase == "finetune" else config.steps
    return dict(task=phase, corpus=CORPUS[phase],
                width=config.heldout_width if phase == "width" else config.width,
                layers=config.layers, heads=config.heads, context=config.context,
                batch_size=config.batch_size,
                epochs=config.finetune_epochs if phase == "finetune" else 1,
                train_bytes=sequences * config.batch_size * config.context + 1,
                validation_bytes=config.validation_sequences * config.context + 1, init=init)


def variant_lrs(label: str, config: LMConfig) -> list[float]:
    if label in ANCHORS:
        return [ANCHORS[label] * m for m in config.anchor_multipliers]
    return list(config.lrs)


def grid(base: dict, variants, config: LMConfig) -> list[dict]:
    return [dict(base, variant=label, lr=lr, seed=seed) for seed in range(config.seeds)
            for label in variants for lr in variant_lrs(label, config)]


def _data(task: dict) -> tuple[Split, Digits]:
    data = load_split(task["corpus"], task["train_bytes"], task["validation_bytes"])
    return data, as_task_data(data, task["context"])


def _train(task: dict, directory: str, on_epoch_end=None) -> tuple[dict, nn.Module, object]:
    """Trains the run ``task`` describes: (history, model, optimizer)."""
    built = {}

    def model():
        built["model"] = GPT(task["width"], task["layers"], task["heads"], task["context"])
        if task["init"]:
            checkpoint = torch.load(os.path.join(directory, task["init"]), weights_only=True)
            built["model"].load_state_dict(checkpoint["model"])
        return built["model"]

    def optimizer(params, steps_per_epoch):
        built["optimizer"] = make_optimizer(task["variant"], task["lr"], params, steps_per_epoch)
        return built["optimizer"]

    history = train(model, optimizer, _data(task)[1], task["epochs"], task["batch_size"],
                    task["seed"], on_epoch_end=on_epoch_end)
    return history, built["model"], built["optimizer"]


def _quantile(values: torch.Tensor, q: float) -> float:
    """Nearest rank, as the optimizers' gain_stats()."""
    return values.kthvalue(max(1, math.ceil(q * values.numel()))).values.item()


def run_one(task: dict, directory: str) -> dict:
    """One training run; ``directory`` holds the fine-tune's checkpoint. The row: the final
    validation loss (nats/byte) and train loss (the last epoch's mean), and for ActiveAdamW the
    window, gain_inc and the final gains (median, p99, max over every element); ``curves``:
    per-epoch values."""
    from adaptive_lr import backends

    gains = {"gain_median": [], "gain_p99": [], "gain_max": []}

    def record_gains(optimizer):
        every = torch.cat([s["gain"].flatten() for s in optimizer.gain_stats().values()])
        for key, q in (("gain_median", 0.5), ("gain_p99", 0.99), ("gain_max", 1.0)):
            gains[key].append(_quantile(every, q))

    active = window_rule(task["variant"]) is not None
    history, _, optimizer = _train(task, directory, record_gains if active else None)
    return {**task, "validation_loss": history["test_loss"][-1],
            "train_loss": history["train_loss"][-1],
            "window": optimizer.steps_per_epoch if active else None,
            "gain_inc": optimizer.param_groups[0]["gain_inc"] if active else None,
            **{key: values[-1] if values else None for key, values in gains.items()},
            "seconds": history["seconds"],
            "backend": backends.choose("auto", "cpu") if active else "",
            "curves": {"validation_loss": history["test_loss"], **gains}}


def _pretrain(task: dict, directory: str, name: str, finetune: dict) -> dict:
    """Trains the fine-tune's starting point and saves it (with its losses) as ``name``."""
    history, model, _ = _train(task, directory)
    losses = {"validation_loss": history["test_loss"][-1],
              "finetune_validation_loss": loss_on(model, _data(finetune)[1])}
    torch.save({"model": model.state_dict(), "task": task, **losses},
               os.path.join(directory, name))
    return losses


def pretrained(config: LMConfig, lr: float, directory: str) -> tuple[str, dict] | None:
    """The checkpoint file (in ``directory``) of AdamW pretrained at ``lr``, seed 0, and its
    losses; trained once per settings, data and torch version (the file name's key). None if
    its training failed or was interrupted."""
    task = dict(settings(config, "pretrain"), variant="AdamW", lr=lr, seed=0)
    key = json.dumps([task, fingerprint(_data(task)[0]), torch.__version__], sort_keys=True)
    name = f"lm_pretrained_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if not os.path.exists(os.path.join(directory, name)):
        outcome = runner.run_tasks(functools.partial(_pretrain, directory=directory, name=name,
                                                     finetune=settings(config, "finetune")),
                                   [task], 1, "lm: pretrained checkpoint")
        if not outcome.rows:
            return None
    checkpoint = torch.load(os.path.join(directory, name), weights_only=True)
    return name, {key: checkpoint[key] for key in ("task", "validation_loss",
                                                   "finetune_validation_loss")}


# ------------------------------------------------------------------------------- statistics

RESCUE_FACTORS = (10, 30)  # rescue: at the lrs 10× and 30× below AdamW's tuned lr ...
RESCUE_SHARE = 0.5  # ... close >= 50 % of AdamW's gap to its tuned loss
HARM = 0.01  # no harm: <= AdamW's loss + 1 % from the tuned lr up, while AdamW trains ...
TRAINS = 0.5  # ... i.e. closes >= 50 % of the gap from the untrained baseline to its tuned loss
GRID_MATCH = 1.2  # a grid lr within this factor of tuned / factor stands for it


def cell_means(rows: list[dict]) -> dict[tuple[str, float], tuple[float, float, int]]:
    """(variant, lr) -> mean, sd and number of the seeds' final validation losses (a diverged
    run counts as +inf)."""
    groups: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["lr"]), []).append(
            runner.finite_or_inf(r["validation_loss"]))
    return {key: (*runner.mean_sd(values), len(values)) for key, values in groups.items()}


def tuned_lr(means: dict[tuple[str, float], float]) -> float | None:
    """AdamW's lr with the lowest mean validation loss."""
    adamw = {lr: v for (label, lr), v in means.items() if label == "AdamW" and math.isfinite(v)}
    return min(adamw, key=adamw.get) if adamw else None


def trains_below(baseline: float, tuned_loss: float) -> float:
    """AdamW still trains at an lr where its loss is below this: it closes TRAINS of the gap from
    ``baseline`` (the loss without training) to its tuned loss."""
    return baseline - TRAINS * (baseline - tuned_loss)


def criteria(means: dict[tuple[str, float], float], label: str, baseline: float) -> dict:
    """The issue's goals for one variant (``means``: (variant, lr) -> mean validation loss).
    Rescue: at the grid lrs 10× and 30× below AdamW's tuned lr, the share of AdamW's gap to its
    tuned loss that the variant closes. No harm: from the tuned lr up to the largest lr at which
    AdamW still trains (see trains_below; ``baseline``: the loss without training), the
    variant's loss over AdamW's."""
    adamw = {lr: v for (name, lr), v in means.items() if name == "AdamW"}
    tuned = tuned_lr(means)
    out = dict(variant=label, tuned_lr=tuned, rescue=[], rescue_min=None, rescue_met=False,
               harm=[], failing=0, missing=0, worst_excess=None, no_harm=False)
    if tuned is None:
        return out
    for factor in RESCUE_FACTORS:
        lr = min(adamw, key=lambda x: abs(math.log(x * factor / tuned)))
        lr = lr if abs(math.log(lr * factor / tuned)) <= math.log(GRID_MATCH) else None
        base, value = adamw.get(lr), means.get((label, lr))
        share = None if base is None or value is None or not base > adamw[tuned] \
            else (base - value) / (base - adamw[tuned])
        out["rescue"].append(dict(factor=factor, lr=lr, adamw=base, value=value, share=share))
    shares = [c["share"] for c in out["rescue"]]
    if None not in shares:
        out.update(rescue_min=min(shares), rescue_met=min(shares) >= RESCUE_SHARE)
    for lr in sorted(lr for lr in adamw if lr >= tuned):
        if not adamw[lr] < trains_below(baseline, adamw[tuned]):
            break
        value = means.get((label, lr))
        excess = None if value is None else value / adamw[lr] - 1
        out["harm"].append(dict(lr=lr, adamw=adamw[lr], value=value, excess=excess))
    excesses = [c["excess"] for c in out["harm"] if c["excess"] is not None]
    out.update(failing=sum(not e <= HARM for e in excesses),
               missing=len(out["harm"]) - len(excesses),
               worst_excess=max(excesses, default=None))
    out["no_harm"] = bool(excesses) and not out["failing"] and not out["missing"]
    return out


def rank(table: list[dict]) -> list[str]:
    """The selection rule of docs/RESULTS.md §6: the variants that do no harm first, by their
    rescue (the smaller share of the two lrs); then the others, by their worst excess (the
    smaller first); ties (to 0.01) -> the longer window (fewer boundaries, closer to today's
    per-epoch default)."""
    def key(c):
        if c["no_harm"]:
            primary = -math.inf if c["rescue_min"] is None else c["rescue_min"]
        else:
            primary = -(math.inf if c["worst_excess"] is None else c["worst_excess"])
        return c["no_harm"], round(primary, 2), window_rule(c["variant"])[0] or math.inf
    return [c["variant"] for c in sorted(table, key=key, reverse=True)]


def relative_lr(label: str, lr: float) -> float:
    """An anchor's lr as a multiple of its default (its grid's coordinate); others' lr."""
    return float(f"{lr / ANCHORS[label]:.6g}") if label in ANCHORS else lr


def task_summary(rows: list[dict], base: dict, baseline: float | None = None) -> dict:
    """A phase's data and model, the unigram baseline, every cell's mean validation loss and
    final gains, and each ActiveAdamW variant's criteria; ``baseline``: the loss without
    training (default: the unigram baseline's)."""
    data, tensors = _data(base)
    stream = torch.frombuffer(bytearray(data.train), dtype=torch.uint8).long()
    unigram = unigram_loss(stream, tensors.y_test)
    baseline = unigram if baseline is None else baseline
    means = cell_means(rows)
    cells = []
    for (label, lr), (mean, sd, runs) in means.items():  # in the grid's order
        at = [r for r in rows if (r["variant"], r["lr"]) == (label, lr)
              and r["gain_max"] is not None]
        gains = {key: runner.mean_sd(r[key] for r in at)[0] if at else None
                 for key in ("gain_p99", "gain_max")}
        cells.append(dict(variant=label, lr=lr, x=relative_lr(label, lr), mean=mean, sd=sd,
                          runs=runs, **gains))
    flat = {key: value[0] for key, value in means.items()}
    tuned = tuned_lr(flat)
    active = [label for label in dict.fromkeys(r["variant"] for r in rows) if window_rule(label)]
    return dict(settings=base, **fingerprint(data),
                parameters=parameters(base["width"], base["layers"], base["heads"],
                                      base["context"]),
                steps_per_epoch=-(-len(tensors.x_train) // base["batch_size"]), unigram=unigram,
                baseline=baseline, tuned_lr=tuned, cells=cells,
                trains_below=None if tuned is None else trains_below(baseline,
                                                                     flat[("AdamW", tuned)]),
                criteria=[criteria(flat, label, baseline) for label in active])


# ---------------------------------------------------------------------------------- reports

TITLES = {"pretrain": "Pretraining: one epoch on the stdlib's top-level modules (selection)",
          "finetune": "Fine-tuning on the stdlib's tests (confirmation)",
          "width": "Pretraining at another width (confirmation)"}


def _loss(mean: float | None, sd: float | None = None) -> str:
    if mean is None:
        return "—"
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def _task_markdown(name: str, t: dict) -> list[str]:
    s = t["settings"]
    out = [f"## {TITLES[name]}", "",
           f"GPT width {s['width']}, {s['layers']} layers, {s['heads']} heads, context "
           f"{s['context']}: {t['parameters']:,} parameters. Corpus `{s['corpus']}`: "
           f"{s['train_bytes']:,} training bytes ({t['train_files']} files), "
           f"{s['validation_bytes']:,} validation bytes ({t['validation_files']} other files); "
           f"file list sha256 `{t['files_sha256']}`, bytes sha256 `{t['bytes_sha256']}`. Batch "
           f"{s['batch_size']}, {t['steps_per_epoch']} steps per epoch, {s['epochs']} epoch(s)"
           + (f", from `{s['init']}`" if s["init"] else "") + ".", "",
           f"Unigram baseline: **{t['unigram']:.3f}** nats/byte. AdamW's tuned lr: "
           + ("—" if t["tuned_lr"] is None else
              f"{t['tuned_lr']:g}; it still trains where its loss is below "
              f"{t['trains_below']:.3f} (half-way from the untrained {t['baseline']:.3f} to its "
              "tuned loss)") + ".", ""]
    cells = {(c["variant"], c["x"]): c for c in t["cells"]}
    variants = list(dict.fromkeys(c["variant"] for c in t["cells"]))
    for kind, members in (("lr", [v for v in variants if v not in ANCHORS]),
                          ("× default", [v for v in variants if v in ANCHORS])):
        if not members:
            continue
        columns = sorted({x for (v, x) in cells if v in members})
        out += ["Validation loss, nats/byte (mean ± sd over seeds)" if kind == "lr" else
                "Anchors (lr = their default × a multiplier): validation loss", "",
                "| variant | " + " | ".join(f"{kind} {x:g}" for x in columns) + " |",
                "|---" * (len(columns) + 1) + "|"]
        for v in members:
            out.append(f"| {v} | " + " | ".join(
                "—" if (v, x) not in cells else _loss(
                    cells[(v, x)]["mean"], cells[(v, x)]["sd"] if cells[(v, x)]["runs"] > 1
                    else None) for x in columns) + " |")
        out.append("")
    if t["criteria"]:
        out += ["Goals (rescue: share of AdamW's gap closed, ≥ 50 % at both lrs; no harm: loss "
                "≤ AdamW's + 1 % from the tuned lr up while AdamW trains)", "",
                "| variant | rescue, 10× below | rescue, 30× below | no harm: worst excess "
                "(cells failing / checked) | rescue met | no harm met |",
                "|---|---|---|---|---|---|"]
        for c in t["criteria"]:
            rescue = [f"{_share(r['share'])}" + (f" (lr {r['lr']:g})" if r["lr"] else "")
                      for r in c["rescue"]] or ["—", "—"]
            worst = "—" if c["worst_excess"] is None else f"{100 * c['worst_excess']:+.1f} %"
            out.append(f"| {c['variant']} | {rescue[0]} | {rescue[1]} | {worst} ({c['failing']} "
                       f"/ {len(c['harm'])}"
                       + (f", {c['missing']} not run" if c["missing"] else "") + ") | "
                       f"{'yes' if c['rescue_met'] else 'no'} | "
                       f"{'yes' if c['no_harm'] else 'no'} |")
        out.append("")
        gains = [c for c in t["cells"] if c["gain_max"] is not None]
        lrs = sorted({c["x"] for c in gains})
        out += ["Final gains, p99 / max over every element (mean over seeds)", "",
                "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                "|---" * (len(lrs) + 1) + "|"]
        for v in dict.fromkeys(c["variant"] for c in gains):
            out.append(f"| {v} | " + " | ".join(
                "—" if (v, lr) not in cells or cells[(v, lr)]["gain_max"] is None else
                f"{cells[(v, lr)]['gain_p99']:.3g} / {cells[(v, lr)]['gain_max']:.3g}"
                for lr in lrs) + " |")
        out.append("")
    return out


def markdown(summary: dict) -> str:
    out = ["# Short runs: the sign window on a byte-level language model", ""]
    note = runner.partial_note(summary["runs"])
    if note:
        out += [note, ""]
    m = summary["machine"]
    out += [f"Python {m['python']}, torch {m['torch']}, one thread per run; ActiveAdamW on "
            f"the backend(s) {', '.join(summary['backends']) or '—'}, compact state.", ""]
    if summary.get("ranking"):
        top = next(c for c in summary["tasks"]["pretrain"]["criteria"]
                   if c["variant"] == summary["ranking"][0])
        out += [f"Selection (pretraining): **{summary['ranking'][0]}**"
                + (f", runner-up {summary['ranking'][1]}" if len(summary["ranking"]) > 1 else "")
                + f" (ranking: {', '.join(summary['ranking'])}); the goals are "
                + ("met" if top["rescue_met"] and top["no_harm"] else "**not met**")
                + " by the selected variant.", ""]
    if "pretrained" in summary:
        p = summary["pretrained"]
        out += [f"Fine-tuning starts from AdamW pretrained at lr {p['task']['lr']:g} (seed 0): "
                f"validation loss {p['validation_loss']:.3f} on the pretraining data, "
                f"{p['finetune_validation_loss']:.3f} on the fine-tuning data before fine-tuning.",
                ""]
    for name, t in summary["tasks"].items():
        out += _task_markdown(name, t)
    return "\n".join(out) + "\n"


def plot(summary: dict, path: str) -> None:
    """Mean validation loss against lr / the method's default lr, one panel per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    palette = plt.get_cmap("tab20").colors
    colors = iter(palette[::2] + palette[1::2])  # the strong colours first
    styles: dict[str, dict] = {}
    for ax, (name, t) in zip(axes[0], tasks.items()):
        for label in dict.fromkeys(c["variant"] for c in t["cells"]):
            if label not in styles:
                styles[label] = (dict(color="black", ls="--", marker="s", zorder=3)
                                 if label == "AdamW"
                                 else dict(color=next(colors), ls=":", marker="x")
                                 if label in ANCHORS else dict(color=next(colors), marker="o"))
            points = [(c["x"] / (1.0 if label in ANCHORS else ADAMW_DEFAULT_LR), c["mean"])
                      for c in t["cells"] if c["variant"] == label]
            ax.plot(*zip(*points), label=label, ms=4, **styles[label])
        ax.axhline(t["unigram"], color="gray", lw=0.8, label="unigram baseline")
        finite = [c["mean"] for c in t["cells"] if math.isfinite(c["mean"])] or [t["unigram"]]
        ax.set_ylim(min(finite) - 0.05, min(max(finite), t["unigram"]) + 0.1)
        ax.set_xscale("log")
        ax.set_xlabel("lr / the method's default lr (AdamW 1e-3)")
        ax.set_title(TITLES[name], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("final validation loss, nats/byte")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------- run


def _csv_row(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "curves"}


def run(config: LMConfig, out_dir: str, workers: int) -> dict:
    """Run the pretraining phase (the others need its AdamW runs and its ranking), then the
    chosen confirmation phases with AdamW, the selected and runner-up variants, Wepoch and the
    anchors (those in ``config.variants``); write lm_runs.jsonl (the journal, shared by the
    phases), lm_<phase>.csv, lm.json, lm.md, lm.png and the fine-tune's checkpoint into
    ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    journal = os.path.join(out_dir, "lm_runs.jsonl")
    function = functools.partial(run_one, directory=out_dir)
    summary: dict = {"config": asdict(config), "runs": {}, "tasks": {},
                     "machine": runner.machine()}
    backends: set[str] = set()

    def phase(name: str, base: dict, variants, baseline: float | None = None) -> None:
        outcome = runner.run_phase(function, grid(base, variants, config), workers, f"lm: {name}",
                                   journal, os.path.join(out_dir, f"lm_{name}.csv"), _csv_row)
        summary["runs"][name] = outcome.status()
        summary["tasks"][name] = task_summary(outcome.rows, base, baseline)
        backends.update(r["backend"] for r in outcome.rows if r["backend"])

    interrupted = lambda: any(s["interrupted"] for s in summary["runs"].values())  # noqa: E731
    phase("pretrain", settings(config, "pretrain"), config.variants)
    ranking = rank(summary["tasks"]["pretrain"]["criteria"])
    summary["ranking"] = ranking
    confirm = list(dict.fromkeys(["AdamW", *ranking[:2], *(
        v for v in config.variants if v == "Wepoch" or v in ANCHORS)]))
    summary["confirmation_variants"] = confirm
    tuned = summary["tasks"]["pretrain"]["tuned_lr"]
    if "finetune" in config.phases and tuned is not None and not interrupted():
        checkpoint = pretrained(config, tuned, out_dir)
        if checkpoint is not None:
            name, summary["pretrained"] = checkpoint
            phase("finetune", settings(config, "finetune", name), confirm,
                  summary["pretrained"]["finetune_validation_loss"])
    if "width" in config.phases and not interrupted():
        phase("width", settings(config, "width"), confirm)
    summary["backends"] = sorted(backends)
    plot(summary, os.path.join(out_dir, "lm.png"))
    with open(os.path.join(out_dir, "lm.md"), "w") as f:
        f.write(markdown(summary))
    runner.write_json(os.path.join(out_dir, "lm.json"), summary)
    return summary
