"""The paper's synthetic check of GPO's coefficient generator (docs/recipe.md §8, supplementary Table 6).

Question: can a coefficient generator g(k, N) learn a known pooling pattern from pooled outputs
alone, and does what it learned carry over to set sizes it never saw?

Setup (ours; the paper gives the idea and the numbers, not every detail):

* Features: each set holds N vectors of D values drawn i.i.d. (standard normal by default); every
  dimension is an independent sample of the same pooling problem, so D is a cheap batch multiplier.
* Target: the set pooled under a fixed pattern θ*(N) — the weighted sum of each dimension's values
  sorted in descending order. Patterns (k = 1..N):
    - ``A``      average, θ*_k = 1/N;
    - ``M-1``    max, θ*_1 = 1;
    - ``M-10``   K-max with K = 10, θ*_k = 1/10 for k ≤ 10 (1/N for all k when N < 10);
    - ``T-50%``  mean of the top half, θ*_k = 1/⌈N/2⌉ for k ≤ ⌈N/2⌉ (we round the half *up*, so a
                 one-element set keeps its element);
    - ``L``      linear decay to zero, θ*_k ∝ N − k, i.e. θ*_k = 2(N − k) / (N(N − 1)); θ*_1 = 1 for N = 1.
* Training: each generator (built by :func:`vseinf.pooling.build_pooling`) is trained with Adam on
  the mean squared error between its pooled output and the target. Every step mixes several set
  sizes drawn uniformly from 20–100 (the paper's training range). All generators get the same
  steps, learning rate and data stream (same seed), so the comparison is an equal budget.
* Score: the generator's coefficients θ(N) against θ*(N), as the RMSE over the N positions,
  averaged over the sizes of a range: seen (20–100), unseen smaller (10–19), unseen larger
  (101–120). The paper reports the seen sizes only (numbers in :data:`PAPER_SEEN`).

    vseinf synth [--quick] [--seed S] [--steps N] [--out FILE.json]
                 [--patterns A M-1 ...] [--generators gpo interp ...]

The full run (20 trainings of 400 steps) takes about 4 minutes of one CPU core; ``--quick`` trains
only GPO and the interpolated baseline on A and M-1, in well under a minute.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..pooling import build_pooling

__all__ = [
    "PATTERNS",
    "GENERATORS",
    "GENERATOR_LABELS",
    "PAPER_SEEN",
    "SIZE_RANGES",
    "SynthConfig",
    "FULL",
    "QUICK",
    "QUICK_GENERATORS",
    "QUICK_PATTERNS",
    "pattern_coefficients",
    "pooled_by_pattern",
    "coefficient_rmse",
    "train_generator",
    "run_synth",
    "format_table",
]

PATTERNS = ("A", "M-1", "M-10", "T-50%", "L")
GENERATORS = ("interp", "sincos_mlp", "index_bigru", "gpo")
GENERATOR_LABELS = {
    "interp": "index + interpolated vector",
    "sincos_mlp": "sin/cos + MLP",
    "index_bigru": "index embedding + BiGRU",
    "gpo": "sin/cos + BiGRU (GPO)",
}
# Supplementary Table 6, seen set sizes (RMSE between learned and true coefficients).
PAPER_SEEN = {
    "interp": {"A": 0.0, "M-1": 0.065, "M-10": 0.030, "T-50%": 0.011, "L": 0.004},
    "sincos_mlp": {"A": 0.012, "M-1": 0.003, "M-10": 0.047, "T-50%": 0.032, "L": 0.022},
    "index_bigru": {"A": 0.002, "M-1": 0.002, "M-10": 0.026, "T-50%": 0.011, "L": 0.008},
    "gpo": {"A": 0.0, "M-1": 0.005, "M-10": 0.010, "T-50%": 0.006, "L": 0.0},
}
# Inclusive set-size ranges the coefficients are scored on; training uses "seen" only.
SIZE_RANGES = {"seen": (20, 100), "unseen_smaller": (10, 19), "unseen_larger": (101, 120)}


@dataclass(frozen=True)
class SynthConfig:
    """Training budget of one (generator, pattern) run; the same for every generator.

    Args:
        steps: Adam steps.
        lr: peak learning rate.
        warmup: fraction of the steps with a linear learning-rate warm-up; cosine decay to 0 after.
        sizes_per_step: distinct set sizes drawn per step, uniformly from the seen range.
        sets_per_size: sets drawn for each of those sizes.
        dim: values per element (each dimension is an independent pooling problem).
        features: element distribution, "normal" (standard normal) or "uniform" (on [0, 1)).
    """

    steps: int = 400
    lr: float = 0.01
    warmup: float = 0.0
    sizes_per_step: int = 16
    sets_per_size: int = 4
    dim: int = 32
    features: str = "normal"


# The full budget: 20 runs in about 4 minutes of one CPU core (see run_synth). Chosen as the best
# single setting for all four generators together (seed 0, 400 steps): lr 0.02 helped GPO and the
# MLP a little but left the index-embedding BiGRU stuck on L (.136) and M-10 (.053), and a 10%
# warm-up fixed only L; uniform features were worse for GPO than normal ones; 4× more samples per
# step (D = 128, 8 sets per size) did not help.
FULL = SynthConfig()
# The smoke test: GPO and the cheapest baseline on the two simplest patterns, enough steps for GPO
# to learn both (the average is the slow one: a fresh GPO's θ starts near zero at both ends, where
# the softmax gradient is proportional to θ itself). About 20 s of one CPU core.
QUICK = SynthConfig(steps=200, lr=0.03, sizes_per_step=4, sets_per_size=8, dim=64)
QUICK_GENERATORS = ("interp", "gpo")
QUICK_PATTERNS = ("A", "M-1")


# ---------------------------------------------------------------------------------------------
# The patterns


def pattern_coefficients(pattern: str, n: int) -> torch.Tensor:
    """θ*(n) of a pattern as a float64 vector of length n summing to 1 (see the module docstring)."""
    if n < 1:
        raise ValueError(f"set size must be >= 1, got {n}")
    k = torch.arange(n, dtype=torch.float64)  # 0-based position: k = 0 is the largest value
    if pattern == "A":
        theta = torch.ones(n, dtype=torch.float64)
    elif pattern == "M-1":
        theta = (k < 1).double()
    elif pattern == "M-10":
        theta = (k < 10).double()
    elif pattern == "T-50%":
        theta = (k < math.ceil(n / 2)).double()
    elif pattern == "L":
        theta = (n - 1 - k) if n > 1 else torch.ones(1, dtype=torch.float64)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
    return theta / theta.sum()


def _pattern_table(pattern: str, n_max: int) -> torch.Tensor:
    """(n_max + 1) × n_max table: row n holds θ*(n) padded with zeros (row 0 unused)."""
    table = torch.zeros(n_max + 1, n_max, dtype=torch.float64)
    for n in range(1, n_max + 1):
        table[n, :n] = pattern_coefficients(pattern, n)
    return table


def pooled_by_pattern(features: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The training target: each dimension's valid values sorted in descending order, weighted by
    θ*(length). Written independently of vseinf.pooling so the target cannot share its bugs."""
    n_max = features.shape[1]
    mask = (torch.arange(n_max).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2)
    ordered = features.masked_fill(~mask, -math.inf).sort(dim=1, descending=True).values
    ordered = ordered.masked_fill(~mask, 0.0)
    theta = table[lengths, :n_max].to(features.dtype).unsqueeze(2)
    return (ordered * theta).sum(1)


def coefficient_rmse(pool: nn.Module, pattern: str, sizes: range | list[int]) -> float:
    """Mean over ``sizes`` of the RMSE (over the N positions) between θ(N) and θ*(N)."""
    sizes = list(sizes)
    with torch.no_grad():
        theta = pool.coefficients(torch.tensor(sizes), max(sizes)).double()
    errors = []
    for row, n in enumerate(sizes):
        diff = theta[row, :n] - pattern_coefficients(pattern, n)
        errors.append(diff.pow(2).mean().sqrt().item())
    return sum(errors) / len(errors)


# ---------------------------------------------------------------------------------------------
# Training


def _sample(config: SynthConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = SIZE_RANGES["seen"]
    sizes = torch.randint(low, high + 1, (config.sizes_per_step,), generator=generator)
    lengths = sizes.repeat_interleave(config.sets_per_size)
    shape = (len(lengths), int(lengths.max()), config.dim)
    if config.features == "normal":
        features = torch.randn(shape, generator=generator)
    elif config.features == "uniform":
        features = torch.rand(shape, generator=generator)
    else:
        raise ValueError(f"SynthConfig.features must be 'normal' or 'uniform', got {config.features!r}")
    return features, lengths


def train_generator(name: str, pattern: str, config: SynthConfig = FULL, seed: int = 0,
                    on_step=None) -> nn.Module:
    """Train the coefficient generator ``name`` to reproduce ``pattern``; returns the trained pool.

    The data stream depends only on ``seed`` and ``pattern``, so every generator sees the same sets.
    ``on_step`` (optional) is called after every step, e.g. to advance a progress bar.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
    torch.manual_seed(seed)
    pool = build_pooling(name)
    if not hasattr(pool, "coefficients"):
        raise ValueError(f"{name!r} is not a coefficient generator; choose from {', '.join(GENERATORS)}")
    data = torch.Generator().manual_seed(seed * 1000 + PATTERNS.index(pattern))
    table = _pattern_table(pattern, SIZE_RANGES["seen"][1])
    optimizer = torch.optim.Adam(pool.parameters(), lr=config.lr)
    warmup = int(config.warmup * config.steps)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(config.steps - warmup, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    for _ in range(config.steps):
        features, lengths = _sample(config, data)
        target = pooled_by_pattern(features, lengths, table)
        pooled, _ = pool(features, lengths)
        loss = (pooled - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(loss.item())
    return pool


def _train_and_score(config: SynthConfig, seed: int, patterns, generators, progress: bool) -> dict:
    bar = tqdm(total=config.steps * len(patterns) * len(generators), disable=not progress,
               desc="synth", unit="step")
    rmse: dict = {}
    for name in generators:
        rmse[name] = {split: {} for split in SIZE_RANGES}
        for pattern in patterns:
            bar.set_postfix_str(f"{name} {pattern}")
            pool = train_generator(name, pattern, config, seed, on_step=lambda _loss: bar.update(1))
            for split, (low, high) in SIZE_RANGES.items():
                rmse[name][split][pattern] = coefficient_rmse(pool, pattern, range(low, high + 1))
    bar.close()
    return rmse


def run_synth(quick: bool = False, seed: int = 0, patterns=None, generators=None,
              steps: int | None = None, progress: bool = True, config: SynthConfig | None = None) -> dict:
    """Train every generator on every pattern and score the learned coefficients.

    Args:
        quick: smoke test: ``QUICK`` budget, and unless given, only generators ``interp`` and
            ``gpo`` on patterns ``A`` and ``M-1`` (about 30 s instead of about 5 minutes).
        seed: seeds the generators' initialisation and the data stream.
        patterns: which of :data:`PATTERNS` to run (default: all, or ``QUICK_PATTERNS``).
        generators: which of :data:`GENERATORS` to run (default: all, or ``QUICK_GENERATORS``).
        steps: override the number of training steps.
        progress: show a tqdm progress bar.
        config: override the whole training budget.

    Returns:
        ``{"rmse": {generator: {"seen" | "unseen_smaller" | "unseen_larger": {pattern: float}}},
        "paper": {generator: {pattern: float}} (Table 6, seen sizes, all four generators),
        "config": {...}, "seconds": float}``.
    """
    if patterns is None:
        patterns = QUICK_PATTERNS if quick else PATTERNS
    if generators is None:
        generators = QUICK_GENERATORS if quick else GENERATORS
    patterns, generators = tuple(patterns), tuple(generators)
    for pattern in patterns:
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
    for name in generators:
        if name not in GENERATORS:
            raise ValueError(f"unknown generator {name!r}; choose from {', '.join(GENERATORS)}")
    config = config or (QUICK if quick else FULL)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        config = replace(config, steps=int(steps))

    # The work is thousands of tiny ops (a GRU step is a 32×96 matmul): thread hand-offs cost more
    # than they save, and on a shared CPU one thread runs several times faster. Restored after.
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rmse = _train_and_score(config, seed, patterns, generators, progress)
    finally:
        torch.set_num_threads(threads)
    return {
        "rmse": rmse,
        "paper": {name: dict(values) for name, values in PAPER_SEEN.items()},
        "config": {**asdict(config), "seed": seed, "quick": quick, "patterns": list(patterns),
                   "generators": list(generators), "train_sizes": list(SIZE_RANGES["seen"]),
                   "size_ranges": {k: list(v) for k, v in SIZE_RANGES.items()}},
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------
# Reporting


def _fmt(value: float) -> str:
    """Table 6 style: three decimals, no leading zero ('.010'), '0' when it rounds to zero."""
    text = f"{value:.3f}"
    if float(text) == 0:
        return "0"
    return text[1:] if text.startswith("0.") else text


def format_table(result: dict) -> str:
    """Markdown table: our RMSE per split next to the paper's seen-size numbers."""
    rmse, paper = result["rmse"], result.get("paper", {})
    patterns = [p for p in PATTERNS if any(p in rmse[g]["seen"] for g in rmse)]
    header = ["generator", "sizes"] + patterns + ["mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label, split, values):
        cells = [_fmt(values[p]) if p in values else "–" for p in patterns]
        present = [values[p] for p in patterns if p in values]
        mean = _fmt(sum(present) / len(present)) if present else "–"
        lines.append("| " + " | ".join([label, split] + cells + [mean]) + " |")

    for name in rmse:
        label = GENERATOR_LABELS.get(name, name)
        row(label, "seen 20–100", rmse[name]["seen"])
        if name in paper:
            row("", "paper, seen", paper[name])
        row("", "unseen 10–19", rmse[name]["unseen_smaller"])
        row("", "unseen 101–120", rmse[name]["unseen_larger"])
    config = result.get("config", {})
    lines.append("")
    lines.append(f"RMSE between learned and true coefficients, averaged over set sizes; "
                 f"{config.get('steps', '?')} Adam steps per run, seed {config.get('seed', '?')}, "
                 f"{result.get('seconds', float('nan')):.0f} s in all.")
    return "\n".join(lines)
