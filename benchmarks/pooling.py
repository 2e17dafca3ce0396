"""Forward + backward time of GPO (fast path and reference) against max and average pooling.

    python benchmarks/pooling.py [--out results.json] [--device cuda] [--repeats 20]

Two shapes from the paper: region features (B=128, N=36, D=1024) and grid features (B=32, N=256,
D=1024). Two coefficient regimes: "concentrated" (all but ~1e-9 of θ on the top one or two
positions, as a trained GPO on region features) and "spread" (a freshly initialised GPO).
"naive" is the straightforward implementation: mask, sort every dimension along the set axis,
weight, sum. Ratios are measured against max pooling and against naive in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

from vseinf.pooling import GPO, AvgPool, MaxPool, check_set_batch, valid_mask


class NaiveGPO(torch.nn.Module):
    """The straightforward GPO: θ per sample from the generator, full sort along the set axis."""

    def __init__(self, gpo: GPO):
        super().__init__()
        self.gpo = gpo

    def forward(self, features, lengths):
        lengths = check_set_batch(features, lengths)
        n_max = features.shape[1]
        theta = self.gpo.coefficients(lengths, n_max)  # once per sample, not per distinct size
        mask = valid_mask(lengths, n_max).unsqueeze(2)
        values = features.masked_fill(~mask, -10000).sort(dim=1, descending=True).values
        values = values.masked_fill(~mask, 0)
        return (values * theta.unsqueeze(2)).sum(1), theta


class FixedScoreGPO(GPO):
    """A GPO whose generator output is replaced by fixed scores (to emulate a trained, concentrated θ)."""

    def __init__(self, first_scores):
        super().__init__()
        self.first_scores = torch.tensor(first_scores)

    def size_scores(self, sizes, n_max):
        base = super().size_scores(sizes, n_max) * 0  # keep the generator in the graph
        scores = torch.full((len(sizes), n_max), -10.0)
        m = min(n_max, len(self.first_scores))
        scores[:, :m] = self.first_scores[:m]
        return base + scores.to(base.device)


def time_fwd_bwd(pool, features, lengths, repeats, device):
    def step():
        x = features.detach().requires_grad_(True)
        pooled, _ = pool(x, lengths)
        pooled.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    device = args.device
    torch.manual_seed(0)
    shapes = {"regions": (128, 36, 1024), "grids": (32, 256, 1024)}
    regimes = {
        # scores 0 and -1 then -10: θ_1≈0.99995, θ_2≈4.5e-5, the rest ≈ e^-100
        "concentrated": FixedScoreGPO([0.0, -1.0]),
        "spread": GPO(),
    }
    results = {"device": device, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "cases": []}
    for shape_name, (b, n, d) in shapes.items():
        features = torch.randn(b, n, d, device=device)
        lengths = torch.randint(max(1, n // 2), n + 1, (b,), device=device)
        lengths[0] = n
        t_max = time_fwd_bwd(MaxPool(), features, lengths, repeats, device)
        t_avg = time_fwd_bwd(AvgPool(), features, lengths, repeats, device)
        for regime, gpo in regimes.items():
            gpo = gpo.to(device)
            naive = NaiveGPO(gpo)
            with torch.no_grad():
                fast_out, _ = gpo(features, lengths)
                ref_out, _ = naive(features, lengths)
            max_err = float((fast_out - ref_out).abs().max())
            t_fast = time_fwd_bwd(gpo, features, lengths, repeats, device)
            t_naive = time_fwd_bwd(naive, features, lengths, repeats, device)
            case = {
                "shape": shape_name, "B": b, "N": n, "D": d, "regime": regime,
                "seconds": {"gpo_fast": t_fast, "gpo_naive": t_naive, "max": t_max, "avg": t_avg},
                "gpo_fast_over_max": t_fast / t_max,
                "gpo_naive_over_max": t_naive / t_max,
                "naive_over_fast": t_naive / t_fast,
                "max_abs_error_vs_naive": max_err,
            }
            results["cases"].append(case)
            print(f"{shape_name:8s} {regime:12s} fast {t_fast*1e3:8.2f} ms  naive {t_naive*1e3:8.2f} ms  "
                  f"max {t_max*1e3:7.2f} ms  fast/max {case['gpo_fast_over_max']:5.2f}  "
                  f"naive/fast {case['naive_over_fast']:5.2f}  err {max_err:.1e}", flush=True)
    emit(results, args.out)


if __name__ == "__main__":
    main()
