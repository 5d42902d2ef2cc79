"""The gain-rule study of issue 11 (docs/RESULTS.md §3): which gain rule keeps the paper rule's
rescue of a too-small lr (criterion K) and loses nothing where the base optimizer works
(criterion D)?

Phases, all recorded in one journal (``rules_runs.jsonl``: a run of the same settings is never
run twice, so a re-run resumes and phases share identical runs):

- selection: every candidate rule on the selection tasks (digits MLP and CNN), every pair, the
  lr grid; the rule of docs/RESULTS.md §3.1 picks one candidate per family (Adam family, SGD);
- heldout: base, paper, the selected candidate and the runner-up on tasks not used to choose;
- batch: AdamW at its tuned lr over batch sizes, base vs paper vs the selected candidate;
- anchors: parameter-free optimizers over their own lr grids (default lr × 10^j), each beside
  the pair of its kind (ANCHOR_PAIRS).

Every Active run keeps the per-epoch gain statistics of each param (``gain_stats``).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from adaptive_lr.study import runner
from adaptive_lr.study.digits import MODELS, Digits, load_digits, train
from adaptive_lr.study.lr_sweep import STUDY_PAIRS, make_optimizer

# ------------------------------------------------------------------------------------- tasks


@functools.lru_cache(maxsize=1)
def synthetic_classes() -> Digits:
    """A 10-class problem from sklearn's make_classification: 2000 train / 1000 test points of 40
    standardised features."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(n_samples=3000, n_features=40, n_informative=20, n_redundant=10,
                               n_classes=10, n_clusters_per_class=2, class_sep=1.5,
                               random_state=0)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=1000, random_state=0,
                                                        stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return Digits(as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test))


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def resmlp() -> nn.Module:
    """40 -> 64, two pre-norm residual blocks (hidden 128), LayerNorm, linear classifier."""
    return nn.Sequential(nn.Linear(40, 64), _ResidualBlock(64, 128), _ResidualBlock(64, 128),
                         nn.LayerNorm(64), nn.Linear(64, 10))


SORT_LENGTH, SORT_VOCAB = 8, 16


@functools.lru_cache(maxsize=1)
def sorting() -> Digits:
    """Sequences of 8 tokens from a vocabulary of 16 and their sorted versions: 2048 train /
    1024 test, from a fixed generator."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(SORT_VOCAB, (2048 + 1024, SORT_LENGTH), generator=generator)
    y = x.sort(1).values
    return Digits(x[:2048], y[:2048], x[2048:], y[2048:])


class Sorter(nn.Module):
    """A 2-layer pre-norm transformer encoder (d 32, 4 heads, feed-forward 64, no dropout) that
    reads out a token at every position."""

    def __init__(self, width: int = 32, layers: int = 2, heads: int = 4):
        super().__init__()
        self.token = nn.Embedding(SORT_VOCAB, width)
        self.position = nn.Parameter(torch.randn(SORT_LENGTH, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, SORT_VOCAB)

    def forward(self, x):
        return self.out(self.norm(self.encoder(self.token(x) + self.position)))


class _ConvBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a skip connection (a ResNet basic block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def rescnn() -> nn.Module:
    """The digits as 1x8x8 images: a 3x3 convolution to 16 channels with BatchNorm, two residual
    blocks, global average pooling, a linear classifier."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1, bias=False),
                         nn.BatchNorm2d(16), nn.ReLU(), _ConvBlock(16), _ConvBlock(16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@functools.lru_cache(maxsize=1)
def friedman() -> Digits:
    """Regression: sklearn's make_friedman1 (10 features, 5 of them used, noise sd 1), 2000 train
    / 1000 test points, features and target standardised on the training set."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=3000, n_features=10, noise=1.0, random_state=0)
    mean, std = x[:2000].mean(0), x[:2000].std(0)
    y_mean, y_std = y[:2000].mean(), y[:2000].std()
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor((a - y_mean) / y_std, dtype=torch.float32)  # noqa: E731
    return Digits(as_x(x[:2000]), as_y(y[:2000]), as_x(x[2000:]), as_y(y[2000:]))


def regression_mlp() -> nn.Module:
    """10 -> 64 -> 64 -> 1 with ReLUs, one output per point."""
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 1), nn.Flatten(0))


# task -> (model: a name in digits.MODELS or a builder, data loader)
TASKS = {
    "mlp": ("mlp", lambda: load_digits(0)),
    "cnn": ("cnn", lambda: load_digits(0)),
    "resmlp": (resmlp, synthetic_classes),
    "sorter": (Sorter, sorting),
    "rescnn": (rescnn, lambda: load_digits(0)),
    "friedman": (regression_mlp, friedman),  # its "accuracy" is the test R² (digits.r2_score)
}
SELECTION_TASKS = ("mlp", "cnn")
HELDOUT_TASKS = ("resmlp", "sorter")
# issue 21's second round (docs/RESULTS.md §5.6): tasks no earlier round has run
CONFIRM_TASKS = ("rescnn", "friedman")
TASK_BATCH_SIZE = {"rescnn": 128}  # the other tasks train at the config's batch size

# ---------------------------------------------------------------------------------- candidates

# candidate -> the Active optimizer's gain-rule keywords (None: the base optimizer). The paper's
# rule and its variants say sign_threshold=0: every optimizer's default is the sign test now.
PAPER_RULE = {"sign_threshold": 0.0}
CANDIDATES = {
    "base": None,
    "paper": PAPER_RULE,
    "max_gain=10": {"max_gain": 10.0, **PAPER_RULE},
    "gain_inc=0.5": {"gain_inc": 0.5, **PAPER_RULE},
    "k=1": {"sign_threshold": 1.0},
    "k=2": {"sign_threshold": 2.0},
    "k=3": {"sign_threshold": 3.0},
    # issue 21 (docs/RESULTS.md §5): SGD and Lion, the sign test on the epoch's sum of g**2
    "sq-k=1": {"sign_threshold": 1.0},
    "sq-k=2": {"sign_threshold": 2.0},
    "sq-k=3": {"sign_threshold": 3.0},
    # issue 21's third round (docs/RESULTS.md §5.8): sq-k=2, and a held gain above 1 relaxes
    # toward 1 by gain_dec
    "sq-k=2-relax": {"sign_threshold": 2.0, "relax_gains": True},
}
# optimizers with a second moment: the sign test on it (k=...)
ADAM_FAMILY = ("AdamW", "RAdam", "AdaBelief", "Adam")
SECOND_MOMENT_CANDIDATES = ("k=1", "k=2", "k=3")
# optimizers without one: the sign test on the epoch's sum of g**2 (issue 21, sq-k=...)
NO_SECOND_MOMENT = ("SGD", "Lion")
NOISE_CANDIDATES = ("sq-k=1", "sq-k=2", "sq-k=3", "sq-k=2-relax")
# anchor -> its default lr
ANCHORS = {"Prodigy": 1.0, "SF-AdamW": 0.0025, "DoG": 1.0, "DAdaptSGD": 1.0}
# pair -> the anchors it is compared with, parameter-free methods of its kind; Lion's is Prodigy
# (issue 21: dadaptation's own Lion variant is, by its change log, highly experimental)
ANCHOR_PAIRS = {"SGD": ("DoG", "DAdaptSGD"), "Lion": ("Prodigy",),
                "AdamW": ("Prodigy", "SF-AdamW")}
PHASES = ("selection", "heldout", "batch", "anchors", "confirm")
D_THRESHOLD = -0.01  # criterion D: Active >= base - 1 point
K_THRESHOLD = 0.8  # criterion K: the pooled share of the paper rule's gain
BASE_WORKS = 0.5  # D counts the cells where the base reaches 50 %
RESCUE_LR = 1e-4  # K counts the cells at lr <= 1e-4 ...
RESCUE_GAIN = 0.02  # ... where the paper rule gains > 2 points
TOLERANCE = 1e-9


def family(pair: str) -> str:
    return "Adam family" if pair in ADAM_FAMILY else pair


def applies(candidate: str, pair: str) -> bool:
    """k=... (the second-moment sign test) is for the Adam family; sq-k=... (issue 21) for SGD
    and Lion; every other candidate for every pair."""
    if candidate in SECOND_MOMENT_CANDIDATES:
        return pair in ADAM_FAMILY
    if candidate in NOISE_CANDIDATES:
        return pair in NO_SECOND_MOMENT
    return True


def make_anchor(name: str, params, lr: float):
    if name == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr)
    if name == "SF-AdamW":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=lr)
    if name == "DoG":
        import logging

        from dog import DoG

        class DivergingDoG(DoG):
            """DoG, except that a diverged run goes on, at NaN weights like any other optimizer's
            diverged run, where DoG asserts that its sum of squared gradients is not NaN."""

            def _update_group_state(self, group, init):
                try:
                    super()._update_group_state(group, init)
                except AssertionError:  # the step then moves by NaN gradients: NaN weights
                    pass

        # it logs a warning for every lr but 1; the grid changes the lr on purpose
        logging.getLogger("dog").setLevel(logging.ERROR)
        # the plain optimizer, without the package's PolynomialDecayAverager of the weights
        return DivergingDoG(params, lr=lr)
    if name == "DAdaptSGD":
        from dadaptation import DAdaptSGD

        return DAdaptSGD(params, lr=lr)  # its default momentum, 0
    raise ValueError(f"unknown anchor {name!r}")


# -------------------------------------------------------------------------------------- runs


def _compact(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def run_one(task: dict) -> dict:
    """One training run: ``task`` names the task, the optimizer (``pair`` + ``candidate``, or an
    anchor with candidate "anchor"), lr, seed, epochs and batch size. The result row has the
    final and best test accuracy, per-epoch curves and, for an Active run, per-epoch gain
    statistics of every param (``gains``: param name -> statistic -> one value per epoch)."""
    from adaptive_lr import backends

    build, data = TASKS[task["task"]]
    built = {}

    def model():
        built["model"] = (MODELS[build] if isinstance(build, str) else build)()
        return built["model"]

    rule = CANDIDATES.get(task["candidate"])
    if task["candidate"] == "anchor":
        make = lambda params, spe: make_anchor(task["pair"], params, task["lr"])  # noqa: E731
    else:
        make = lambda params, spe: make_optimizer(  # noqa: E731
            task["pair"], rule is not None, params, task["lr"], spe, **(rule or {}))
    gains: dict[str, dict[str, list]] = {}
    previous: dict = {}

    def record_gains(optimizer):
        names = [name for name, _ in built["model"].named_parameters()]
        stats = optimizer.gain_stats(previous.get("stats"))
        previous["stats"] = stats
        for key, entry in stats.items():
            name = names[int(key.split(".")[1])]
            for stat in ("median", "p99", "max", "grew", "shrank"):
                gains.setdefault(name, {}).setdefault(stat, []).append(_compact(entry.get(stat)))

    history = train(model, make, data(), task["epochs"], task["batch_size"], task["seed"],
                    on_epoch_end=record_gains if rule is not None else None)
    accuracy = history["test_accuracy"]
    backend = backends.choose("auto", "cpu") if rule is not None else ""
    return {
        **task, "final_train_loss": history["train_loss"][-1],
        "final_test_accuracy": accuracy[-1], "best_test_accuracy": max(accuracy),
        "seconds": history["seconds"], "backend": backend,
        "train_loss": [_compact(v) for v in history["train_loss"]],
        "test_accuracy": [_compact(v) for v in accuracy], "gains": gains,
    }


@dataclass(frozen=True)
class RulesConfig:
    selection_tasks: tuple[str, ...] = SELECTION_TASKS
    heldout_tasks: tuple[str, ...] = HELDOUT_TASKS
    confirm_tasks: tuple[str, ...] = CONFIRM_TASKS
    pairs: tuple[str, ...] = STUDY_PAIRS
    # the candidates besides the base optimizer (k=... only run for the Adam family)
    candidates: tuple[str, ...] = ("paper", "max_gain=10", "gain_inc=0.5", "k=1", "k=2", "k=3")
    lrs: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    seeds: int = 3
    epochs: int = 40
    batch_size: int = 64
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    anchors: tuple[str, ...] = tuple(ANCHORS)
    anchor_exponents: tuple[int, ...] = (-3, -2, -1, 0, 1, 2, 3)  # lr = default × 10^j
    phases: tuple[str, ...] = PHASES


QUICK = RulesConfig(selection_tasks=("mlp",), heldout_tasks=("resmlp",), pairs=("SGD", "AdamW"),
                    candidates=("paper", "max_gain=10", "k=2"), lrs=(1e-5, 1e-3, 1e-1), seeds=1,
                    epochs=5, batch_sizes=(64, 1024), anchor_exponents=(-2, 0, 2))


def _run(task: str, pair: str, candidate: str, lr: float, seed: int, config: RulesConfig,
         batch_size: int | None = None) -> dict:
    return dict(task=task, pair=pair, candidate=candidate, lr=lr, seed=seed, epochs=config.epochs,
                batch_size=batch_size or TASK_BATCH_SIZE.get(task, config.batch_size))


def grid_tasks(config: RulesConfig, tasks: tuple[str, ...],
               candidates_of: dict[str, list[str]]) -> list[dict]:
    """Every (task, seed, pair, candidate, lr) run; ``candidates_of``: pair -> its candidates."""
    return [_run(task, pair, candidate, lr, seed, config)
            for task in tasks for seed in range(config.seeds) for pair in config.pairs
            for candidate in candidates_of[pair] for lr in config.lrs]


def selection_candidates(config: RulesConfig) -> dict[str, list[str]]:
    return {pair: ["base"] + [c for c in config.candidates if applies(c, pair)]
            for pair in config.pairs}


def anchor_lr(anchor: str, exponent: int) -> float:
    return ANCHORS[anchor] * 10.0 ** exponent


def pair_anchors(config: RulesConfig) -> dict[str, list[str]]:
    """Each pair of the config that has anchors among the config's -> those anchors."""
    out = {pair: [a for a in ANCHOR_PAIRS.get(pair, ()) if a in config.anchors]
           for pair in config.pairs}
    return {pair: anchors for pair, anchors in out.items() if anchors}


def anchor_tasks(config: RulesConfig) -> list[dict]:
    """Every anchor run: the anchors of the config's pairs, each once however many pairs it
    anchors (a run is keyed by the anchor's name, not by the pair)."""
    anchors = dict.fromkeys(a for names in pair_anchors(config).values() for a in names)
    return [_run(task, anchor, "anchor", anchor_lr(anchor, j), seed, config)
            for task in config.selection_tasks + config.heldout_tasks
            for seed in range(config.seeds) for anchor in anchors
            for j in config.anchor_exponents]


# ------------------------------------------------------------------------------- statistics


def seed_means(rows: list[dict]) -> dict[tuple, tuple[float, float, int]]:
    """(task, pair, candidate, lr, batch_size) -> (mean, sd, runs) of the final test accuracy."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["task"], r["pair"], r["candidate"], r["lr"], r["batch_size"])
        groups.setdefault(key, []).append(r["final_test_accuracy"])
    return {key: (*runner.mean_sd(values), len(values)) for key, values in groups.items()}


def criteria(means: dict[tuple, float], candidate: str, scope: list[tuple[str, str]],
             lrs: tuple[float, ...]) -> dict:
    """Criteria D and K of ``candidate`` over the (task, pair) cells of ``scope`` (and the lr
    grid); ``means``: (task, pair, candidate, lr) -> mean final accuracy (a fraction). Cells whose
    runs are missing are left out. Points in the result are percentage points."""
    d_cells, k_cells = [], []
    for task, pair in scope:
        if not applies(candidate, pair):
            continue
        for lr in lrs:
            base = means.get((task, pair, "base", lr))
            value = means.get((task, pair, candidate, lr))
            paper = means.get((task, pair, "paper", lr))
            if base is None or value is None:
                continue
            if base >= BASE_WORKS:
                d_cells.append(((task, pair, lr), value - base))
            if lr <= RESCUE_LR * (1 + TOLERANCE) and paper is not None \
                    and paper - base > RESCUE_GAIN:
                k_cells.append(((task, pair, lr), value - base, paper - base))
    result = dict(candidate=candidate, d_cells=len(d_cells), k_cells=len(k_cells),
                  worst_d=None, worst_d_cell=None, failing_d=0, failing_d_cells=[],
                  pooled_k=None, worst_k=None, worst_k_cell=None)
    if d_cells:
        cell, worst = min(d_cells, key=lambda c: c[1])
        failing = [[*c, 100 * d] for c, d in d_cells if d < D_THRESHOLD - TOLERANCE]
        result.update(worst_d=100 * worst, worst_d_cell=list(cell), failing_d=len(failing),
                      failing_d_cells=failing)
    if k_cells:
        cell, gained, rescued = min(k_cells, key=lambda c: c[1] / c[2])
        result.update(pooled_k=sum(c[1] for c in k_cells) / sum(c[2] for c in k_cells),
                      worst_k=gained / rescued, worst_k_cell=list(cell))
    return result


def keeps_rescue(result: dict) -> bool:
    """Pooled K >= 80 %; with no cell to measure K on (no rescue to keep) it is not a constraint."""
    return result["pooled_k"] is None or result["pooled_k"] >= K_THRESHOLD - TOLERANCE


def rank(results: list[dict]) -> list[str]:
    """The selection rule: the candidates with pooled K >= 80 %, best worst-case D first; the
    same worst D to 0.1 point -> larger pooled K first. The base optimizer is no candidate."""
    eligible = [r for r in results if r["candidate"] != "base" and keeps_rescue(r)]
    key = lambda r: (-math.inf if r["worst_d"] is None else round(r["worst_d"], 1),  # noqa: E731
                     1.0 if r["pooled_k"] is None else r["pooled_k"])
    return [r["candidate"] for r in sorted(eligible, key=key, reverse=True)]


def mean_lookup(rows: list[dict]) -> dict[tuple, float]:
    """(task, pair, candidate, lr) -> mean final accuracy (runs of any one batch size)."""
    return {key[:4]: value[0] for key, value in seed_means(rows).items()}


def families(pairs: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pair in pairs:
        out.setdefault(family(pair), []).append(pair)
    return out


def criteria_tables(rows: list[dict], tasks: tuple[str, ...], pairs: tuple[str, ...],
                    candidates: list[str], lrs: tuple[float, ...]) -> list[dict]:
    """Per family, per scope (each task, then all tasks pooled), per candidate: the criteria."""
    means = mean_lookup(rows)
    ran = {(r["pair"], r["candidate"]) for r in rows}
    table = []
    for name, members in families(pairs).items():
        for scope in [(t,) for t in tasks] + ([tasks] if len(tasks) > 1 else []):
            for candidate in candidates:
                if not any((p, candidate) in ran for p in members):
                    continue
                cells = [(t, p) for t in scope for p in members]
                table.append(dict(family=name, scope="pooled" if len(scope) > 1 else scope[0],
                                  **criteria(means, candidate, cells, lrs)))
    return table


def select(table: list[dict]) -> dict[str, list[str]]:
    """Family -> its candidates ranked by the selection rule on the pooled scope."""
    pooled_scope = {r["scope"] for r in table if r["scope"] == "pooled"} or {
        r["scope"] for r in table}
    return {name: rank([r for r in table if r["family"] == name and r["scope"] in pooled_scope])
            for name in dict.fromkeys(r["family"] for r in table)}


def paired_differences(rows: list[dict], first: str, second: str,
                       lrs: tuple[float, ...]) -> list[dict]:
    """Per (task, pair, lr) cell where the base's mean reaches BASE_WORKS: ``first`` − ``second``
    in points, seed by seed (a seed fixes the initial weights and the batches, so the two runs of
    a seed differ only by the rule), as mean and standard error; ``separated`` when the mean is
    more than two standard errors from 0."""
    by_run = {(r["task"], r["pair"], r["candidate"], r["lr"], r["seed"]): r["final_test_accuracy"]
              for r in rows}
    base = mean_lookup(rows)
    cells = sorted({(r["task"], r["pair"], r["lr"]) for r in rows if r["candidate"] == first})
    out = []
    for task, pair, lr in cells:
        if lr not in lrs or base.get((task, pair, "base", lr), 0.0) < BASE_WORKS:
            continue
        seeds = sorted(seed for t, p, c, l, seed in by_run if (t, p, c, l) == (task, pair, first, lr))
        diffs = [100 * (by_run[(task, pair, first, lr, s)] - by_run[(task, pair, second, lr, s)])
                 for s in seeds if (task, pair, second, lr, s) in by_run]
        if len(diffs) < 2:
            continue
        mean, sd = runner.mean_sd(diffs)
        error = sd / math.sqrt(len(diffs))
        out.append(dict(task=task, pair=pair, lr=lr, seeds=len(diffs), mean=mean, error=error,
                        separated=abs(mean) > 2 * error))
    return out


def tuned_lr(rows: list[dict], task: str, pair: str, lrs: tuple[float, ...]) -> float | None:
    """The base optimizer's lr with the best mean final accuracy (ties: the smaller lr)."""
    means = mean_lookup(rows)
    scored = [(means[(task, pair, "base", lr)], -lr, lr) for lr in lrs
              if (task, pair, "base", lr) in means]
    return max(scored)[2] if scored else None


def anchor_methods(config: RulesConfig, ranking: dict[str, list[str]]
                   ) -> dict[str, list[tuple[str, str, str, tuple[float, ...]]]]:
    """Pair -> (label, the runs' pair, candidate, lr grid) of each method compared on it: the
    base optimizer and its Active version with the paper rule over the lr grid (and with the
    family's selected candidate in ``ranking``, where another), the pair's anchors over theirs
    (pair_anchors)."""
    out = {}
    for pair, anchors in pair_anchors(config).items():
        selected = (ranking.get(family(pair)) or ["paper"])[0]
        out[pair] = [(pair if c == "base" else f"Active{pair} {c}", pair, c, config.lrs)
                     for c in dict.fromkeys(("base", "paper", selected))]
        out[pair] += [(a, a, "anchor", tuple(anchor_lr(a, j) for j in config.anchor_exponents))
                      for a in anchors]
    return out


def anchors_table(rows: list[dict], tasks: tuple[str, ...], config: RulesConfig,
                  ranking: dict[str, list[str]]) -> list[dict]:
    """Per task, pair and method (anchor_methods), over the method's grid: worst and best mean
    final accuracy and the grid points within 1 point of the tuned base (the base optimizer's
    best over its grid)."""
    means = mean_lookup(rows)
    out = []
    for task in tasks:
        for pair, methods in anchor_methods(config, ranking).items():
            base = [means[k] for k in ((task, pair, "base", lr) for lr in config.lrs)
                    if k in means]
            if not base:
                continue
            tuned = max(base)
            for label, run_pair, candidate, grid in methods:
                points = [(means[(task, run_pair, candidate, lr)], lr) for lr in grid
                          if (task, run_pair, candidate, lr) in means]
                if not points:
                    continue
                worst, worst_lr = min(points)
                out.append(dict(task=task, pair=pair, method=label, grid_points=len(points),
                                worst=100 * worst, worst_lr=worst_lr,
                                best=100 * max(points)[0], tuned_base=100 * tuned,
                                within_1_point=sum(v >= tuned - 0.01 - TOLERANCE
                                                   for v, _ in points)))
    return out


# ------------------------------------------------------------------------------------ output


def _points(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f}"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def _cell(cell: list | None) -> str:
    return "" if not cell else f" ({cell[0]} {cell[1]} lr {cell[2]:g})"


def criteria_markdown(table: list[dict], title: str) -> list[str]:
    out = [f"**{title}** (D: Active − base in points over the cells where the base reaches "
           f"≥ {100 * BASE_WORKS:g} %, a cell fails below −1; K: the share of the paper rule's gain "
           f"kept at lr ≤ {RESCUE_LR:g} where that gain is > {100 * RESCUE_GAIN:g} points)", "",
           "| family | scope | candidate | worst D (cell) | cells failing D | pooled K | "
           "worst K (cell) |", "|---|---|---|---|---|---|---|"]
    for r in table:
        out.append(f"| {r['family']} | {r['scope']} | {r['candidate']} | "
                   f"{_points(r['worst_d'])}{_cell(r['worst_d_cell'])} | "
                   f"{r['failing_d']} of {r['d_cells']} | {_share(r['pooled_k'])} | "
                   f"{_share(r['worst_k'])}{_cell(r['worst_k_cell'])} |")
    out.append("")
    for r in table:
        if r["scope"] == "pooled" or not r["failing_d_cells"]:
            continue
        out.append(f"- {r['family']}, {r['candidate']}, {r['scope']}: fails D at " + ", ".join(
            f"{pair} lr {lr:g} ({d:+.1f})" for _, pair, lr, d in r["failing_d_cells"]))
    return out + [""]


def accuracy_markdown(rows: list[dict], tasks: tuple[str, ...], pairs: tuple[str, ...],
                      lrs: tuple[float, ...]) -> list[str]:
    means = seed_means(rows)
    out = []
    for task in tasks:
        out += [f"**{task}: final test accuracy, % (mean ± sd over seeds)**", "",
                "| optimizer | candidate | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                "|---|---" + "|---" * len(lrs) + "|"]
        for pair in pairs:
            candidates = list(dict.fromkeys(r["candidate"] for r in rows
                                            if r["task"] == task and r["pair"] == pair))
            for candidate in candidates:
                cells = []
                for lr in lrs:
                    found = [v for k, v in means.items() if k[:4] == (task, pair, candidate, lr)]
                    cells.append(f"{100 * found[0][0]:.1f} ± {100 * found[0][1]:.1f}"
                                 if found else "—")
                out.append(f"| {pair} | {candidate} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def markdown(summary: dict) -> str:
    config = summary["config"]
    lrs = tuple(config["lrs"])
    out = []
    note = runner.partial_note(summary["runs"])
    if note:
        out += [note, ""]
    out += [f"Active optimizers ran on the backend(s): {', '.join(summary['backends']) or '—'}; "
            f"{config['seeds']} seeds, {config['epochs']} epochs, batch {config['batch_size']}.",
            ""]
    if "selection" in summary:
        s = summary["selection"]
        out += ["## Selection", ""]
        out += criteria_markdown(s["criteria"], "Candidates on the selection tasks")
        for name, ranked in s["ranking"].items():
            out.append(f"- {name}: selected **{ranked[0] if ranked else 'none'}**"
                       + (f", runner-up {ranked[1]}" if len(ranked) > 1 else "")
                       + f" (ranking: {', '.join(ranked) or '—'})")
        out.append("")
        out += accuracy_markdown(s["rows"], tuple(config["selection_tasks"]),
                                 tuple(config["pairs"]), lrs)
    if "heldout" in summary:
        h = summary["heldout"]
        out += ["## Held-out confirmation", ""]
        out += criteria_markdown(h["criteria"], "Candidates on the held-out tasks")
        out += accuracy_markdown(h["rows"], tuple(config["heldout_tasks"]),
                                 tuple(config["pairs"]), lrs)
    if "confirm" in summary:
        c = summary["confirm"]
        out += ["## Confirmation on new tasks", ""]
        out += criteria_markdown(c["criteria"], "Candidates on the confirmation tasks")
        for name, cells in c["paired"].items():
            out += [f"**{name}, seed by seed** (points, mean ± standard error; * more than two "
                    "standard errors from 0)", "", "| task | pair | lr | seeds | difference |",
                    "|---|---|---|---|---|"]
            out += [f"| {d['task']} | {d['pair']} | {d['lr']:g} | {d['seeds']} | "
                    f"{d['mean']:+.1f} ± {d['error']:.1f}{' *' if d['separated'] else ''} |"
                    for d in cells]
            out.append("")
        out += accuracy_markdown(c["rows"], tuple(config["confirm_tasks"]),
                                 tuple(config["pairs"]), lrs)
    if "batch" in summary:
        b = summary["batch"]
        sizes = config["batch_sizes"]
        out += ["## Batch size", "", "AdamW at the base's tuned lr "
                + ", ".join(f"{t} {lr:g}" for t, lr in b["lrs"].items())
                + "; final test accuracy, % (mean ± sd over seeds)", "",
                "| task | candidate | " + " | ".join(f"batch {s}" for s in sizes) + " |",
                "|---|---" + "|---" * len(sizes) + "|"]
        means = seed_means(b["rows"])
        for task, lr in b["lrs"].items():
            for candidate in b["candidates"]:
                cells = [means.get((task, "AdamW", candidate, lr, size)) for size in sizes]
                out.append(f"| {task} | {candidate} | " + " | ".join(
                    "—" if c is None else f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}" for c in cells)
                    + " |")
        out.append("")
    if "anchors" in summary:
        a = summary["anchors"]
        defaults = "; ".join(f"{name}: {ANCHORS[name]:g} × 10^j" for name in dict.fromkeys(
            r["method"] for r in a["table"] if r["method"] in ANCHORS))
        out += ["## Anchors", "", "Each pair beside its anchors, each method over its own lr grid "
                f"(the pair and its Active version: {', '.join(f'{lr:g}' for lr in lrs)}; "
                f"{defaults}; j = {', '.join(map(str, config['anchor_exponents']))}): mean final "
                "test accuracy, %", "",
                "| task | pair | method | worst (lr) | best | tuned base | grid points within 1 "
                "point of tuned base |", "|---|---|---|---|---|---|---|"]
        for r in a["table"]:
            out.append(f"| {r['task']} | {r['pair']} | {r['method']} | {r['worst']:.1f} "
                       f"(lr {r['worst_lr']:g}) | {r['best']:.1f} | {r['tuned_base']:.1f} | "
                       f"{r['within_1_point']} of {r['grid_points']} |")
        out.append("")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------- plots

# the paper rule's collapses (CNN lr 0.1) and 1-2 point losses (lr 1e-2), issue 11
DIAGNOSED = (("cnn", "SGD", 0.1), ("cnn", "AdamW", 0.1), ("cnn", "AdaBelief", 0.1),
             ("mlp", "AdamW", 0.01), ("cnn", "AdamW", 0.01), ("cnn", "AdaBelief", 0.01))


def gain_traces(rows: list[dict], selected: dict[str, str]) -> list[dict]:
    """The runs of DIAGNOSED cells (their gains and curves) of the paper rule and of the
    candidate ``selected`` (family -> candidate) for the pair's family."""
    return [r for r in rows if (r["task"], r["pair"], r["lr"]) in DIAGNOSED
            and r["candidate"] in ("paper", selected.get(family(r["pair"])))]


def plot_gains(traces: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in DIAGNOSED if any((r["task"], r["pair"], r["lr"]) == c for r in traces)]
    if not cells:
        return
    fig, axes = plt.subplots(3, len(cells), figsize=(3.4 * len(cells), 8.4), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for column, cell in enumerate(cells):
        runs = [r for r in traces if (r["task"], r["pair"], r["lr"]) == cell]
        for r in runs:
            style = dict(ls="-" if r["candidate"] == "paper" else "--",
                         alpha=1.0 if r["seed"] == 0 else 0.35)
            if r["seed"] == 0:
                for i, (name, stats) in enumerate(r["gains"].items()):
                    epochs = range(1, len(stats["max"]) + 1)
                    label = name if r["candidate"] == "paper" else None
                    axes[0, column].plot(epochs, stats["max"], color=colors[i % 10], label=label,
                                         **style)
                    axes[1, column].plot(epochs, stats["p99"], color=colors[i % 10], **style)
            epochs = range(1, len(r["test_accuracy"]) + 1)
            color = "tab:red" if r["candidate"] == "paper" else "tab:green"
            axes[2, column].plot(epochs, [100 * a for a in r["test_accuracy"]], color=color,
                                 label=f"{r['candidate']}" if r["seed"] == 0 else None, **style)
        task, pair, lr = cell
        axes[0, column].set_title(f"{task.upper()} Active{pair} lr {lr:g}", fontsize=9)
        for row in (0, 1):
            axes[row, column].set_yscale("log")
        axes[0, column].legend(fontsize=6)
        axes[2, column].legend(fontsize=7)
        axes[2, column].set_ylim(0, 100)
        axes[2, column].set_xlabel("epoch")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("max gain per param (seed 0)")
    axes[1, 0].set_ylabel("p99 gain per param (seed 0)")
    axes[2, 0].set_ylabel("test accuracy, % (all seeds)")
    fig.suptitle("gains at the paper rule's failures: paper rule solid, selected rule dashed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(rows: list[dict], tasks: tuple[str, ...], pairs: tuple[str, ...],
                  candidates: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = seed_means(rows)
    fig, axes = plt.subplots(len(tasks), len(pairs), figsize=(3.4 * len(pairs), 2.8 * len(tasks)),
                             squeeze=False, sharex=True)
    styles = {"base": dict(color="tab:gray", ls="--", marker="s"),
              "paper": dict(color="tab:red", marker="o")}
    for i, task in enumerate(tasks):
        for j, pair in enumerate(pairs):
            ax = axes[i, j]
            for candidate in candidates:
                points = sorted((k[3], v[0]) for k, v in means.items()
                                if k[:3] == (task, pair, candidate))
                if points:
                    ax.plot([p[0] for p in points], [100 * p[1] for p in points],
                            label=candidate, **styles.get(candidate, dict(color="tab:green",
                                                                          marker="^")))
            ax.set_xscale("log")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            ax.set_title(f"{task}: {pair}", fontsize=9)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=len(handles),
               fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("lr")
    for ax in axes[:, 0]:
        ax.set_ylabel("final test accuracy, %")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_anchors(rows: list[dict], tasks: tuple[str, ...], config: RulesConfig,
                 ranking: dict[str, list[str]], path: str) -> None:
    """Mean final accuracy against lr / the middle of the method's grid (an anchor's: its default
    lr), one row of panels per pair (anchor_methods), one column per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_lookup(rows)
    methods = anchor_methods(config, ranking)
    if not methods:
        return
    styles = {"base": dict(color="tab:gray", ls="--", marker="s"),
              "paper": dict(color="tab:red", marker="o"),
              **{a: dict(color=color, ls=":", marker="x") for a, color in
                 zip(ANCHORS, ("tab:purple", "tab:orange", "tab:brown", "tab:blue"))}}
    fig, axes = plt.subplots(len(methods), len(tasks),
                             figsize=(3.6 * len(tasks), 3.4 * len(methods)), squeeze=False)
    for row, (pair, pair_methods) in zip(axes, methods.items()):
        for ax, task in zip(row, tasks):
            for label, run_pair, candidate, grid in pair_methods:
                middle = grid[len(grid) // 2]
                points = [(lr / middle, 100 * means[(task, run_pair, candidate, lr)])
                          for lr in grid if (task, run_pair, candidate, lr) in means]
                if points:
                    ax.plot(*zip(*points), label=label, **styles.get(
                        run_pair if candidate == "anchor" else candidate,
                        dict(color="tab:green", marker="^")))
            ax.set_xscale("log")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            ax.set_title(f"{task}: {pair}", fontsize=9)
            ax.set_xlabel("lr / the middle of the method's grid")
        row[0].set_ylabel("final test accuracy, %")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------- run

SCALARS = ("task", "pair", "candidate", "lr", "seed", "epochs", "batch_size",
           "final_train_loss", "final_test_accuracy", "best_test_accuracy", "seconds", "backend",
           "gain_max_final", "gain_p99_final")


def _scalar_row(row: dict) -> dict:
    final = [s for s in row["gains"].values()]
    return {**{k: row[k] for k in SCALARS if k in row},
            "gain_max_final": max((s["max"][-1] for s in final), default=None),
            "gain_p99_final": max((s["p99"][-1] for s in final), default=None)}


def run(config: RulesConfig, out_dir: str, workers: int) -> dict:
    """Run the chosen phases (each needs the selection's results but anchors); write
    rules_runs.jsonl (the journal), rules_<phase>.csv, rules.json, rules.md, rules_gains.json
    and the plots into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    journal = os.path.join(out_dir, "rules_runs.jsonl")
    summary: dict = {"config": asdict(config), "runs": {}, "machine": runner.machine()}
    all_rows: list[dict] = []

    def phase(name: str, tasks: list[dict]) -> list[dict]:
        outcome = runner.run_tasks(run_one, tasks, workers, f"rules: {name}", journal)
        summary["runs"][name] = outcome.status()
        runner.write_csv(os.path.join(out_dir, f"rules_{name}.csv"),
                         [_scalar_row(r) for r in outcome.rows])
        all_rows.extend(outcome.rows)
        return outcome.rows

    interrupted = lambda: any(s["interrupted"] for s in summary["runs"].values())  # noqa: E731
    ranking: dict[str, list[str]] = {}
    selection_rows: list[dict] = []
    if "selection" in config.phases or "heldout" in config.phases or "batch" in config.phases:
        # held-out and batch phases need the selection (from the journal when already run)
        selection_rows = phase("selection", grid_tasks(config, config.selection_tasks,
                                                       selection_candidates(config)))
        table = criteria_tables(selection_rows, config.selection_tasks, config.pairs,
                                ["base"] + list(config.candidates), config.lrs)
        ranking = select(table)
        summary["selection"] = dict(criteria=table, ranking=ranking, rows=selection_rows)
        traces = gain_traces(selection_rows, {name: ranked[0] for name, ranked in ranking.items()
                                              if ranked})
        runner.write_json(os.path.join(out_dir, "rules_gains.json"), {"runs": traces})
        plot_gains(traces, os.path.join(out_dir, "rules_gains.png"))
    chosen = {name: ranked[:2] for name, ranked in ranking.items()}
    if "heldout" in config.phases and config.heldout_tasks and not interrupted():
        candidates_of = {pair: list(dict.fromkeys(["base", "paper"] + chosen.get(family(pair), [])))
                         for pair in config.pairs}
        rows = phase("heldout", grid_tasks(config, config.heldout_tasks, candidates_of))
        heldout_candidates = list(dict.fromkeys(c for cs in candidates_of.values() for c in cs))
        summary["heldout"] = dict(
            criteria=criteria_tables(rows, config.heldout_tasks, config.pairs,
                                     heldout_candidates, config.lrs),
            candidates=candidates_of, rows=rows)
    if "confirm" in config.phases and not interrupted():
        # every candidate of the config (no selection): tasks that no earlier phase has run
        # seed by seed, so that a run cut short leaves whole seeds of every task
        tasks = sorted(grid_tasks(config, config.confirm_tasks, selection_candidates(config)),
                       key=lambda task: task["seed"])
        rows = phase("confirm", tasks)
        summary["confirm"] = dict(rows=rows, criteria=criteria_tables(
            rows, config.confirm_tasks, config.pairs, ["base"] + list(config.candidates),
            config.lrs), paired={
                # neighbours among the candidates after the paper rule (sq-k=1 - sq-k=2, ...)
                f"{a} - {b}": paired_differences(rows, a, b, config.lrs)
                for a, b in zip(config.candidates[1:], config.candidates[2:])})
    selected = (ranking.get("Adam family") or [None])[0]
    if "batch" in config.phases and "AdamW" in config.pairs and not interrupted():
        lrs = {task: tuned_lr(selection_rows, task, "AdamW", config.lrs)
               for task in config.selection_tasks}
        lrs = {task: lr for task, lr in lrs.items() if lr is not None}
        candidates = list(dict.fromkeys(["base", "paper"] + ([selected] if selected else [])))
        tasks = [_run(task, "AdamW", candidate, lr, seed, config, size)
                 for task, lr in lrs.items() for seed in range(config.seeds)
                 for size in config.batch_sizes for candidate in candidates]
        summary["batch"] = dict(lrs=lrs, candidates=candidates, rows=phase("batch", tasks))
    if "anchors" in config.phases and not interrupted():
        rows = phase("anchors", anchor_tasks(config))
        grid_rows = selection_rows + summary.get("heldout", {}).get("rows", []) + rows
        summary["anchors"] = dict(table=anchors_table(
            grid_rows, config.selection_tasks + config.heldout_tasks, config, ranking),
            rows=rows)
        plot_anchors(grid_rows, config.selection_tasks + config.heldout_tasks, config, ranking,
                     os.path.join(out_dir, "rules_anchors.png"))
    summary["backends"] = sorted({r["backend"] for r in all_rows if r["backend"]})
    accuracy_tasks = ((config.selection_tasks if selection_rows else ())
                      + (config.heldout_tasks if "heldout" in summary else ())
                      + (config.confirm_tasks if "confirm" in summary else ()))
    plot_candidates = ["base", "paper"] + ([selected] if selected and selected != "paper" else [])
    if "confirm" in summary:  # no selection there: every candidate it ran
        plot_candidates = list(dict.fromkeys(plot_candidates + list(config.candidates)))
    if all_rows and accuracy_tasks:
        plot_accuracy(selection_rows + summary.get("heldout", {}).get("rows", [])
                      + summary.get("confirm", {}).get("rows", []),
                      accuracy_tasks, config.pairs, plot_candidates,
                      os.path.join(out_dir, "rules_accuracy.png"))
    with open(os.path.join(out_dir, "rules.md"), "w") as f:
        f.write(markdown(summary))
    # the JSON keeps the summaries; the runs are in the CSV files (and the journal)
    runner.write_json(os.path.join(out_dir, "rules.json"), {
        key: ({k: v for k, v in value.items() if k != "rows"} if isinstance(value, dict)
              and "rows" in value else value) for key, value in summary.items()})
    return summary
