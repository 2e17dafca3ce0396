"""Forward + backward time of GPO against masked max pooling over the same padded sets.

    python benchmarks/pooling.py [--out results.json] [--device cuda] [--repeats 15] [--quick]

Two shapes from the paper: region features (B=128, N=36, D=1024) and grid features (B=32, N=256,
D=1024), set sizes drawn in N/2..N (the rest padding). θ regimes:

* "concentrated": all but ~1e-9 of θ on the top one or two ranks (a trained GPO on region features);
* "spread": a freshly initialised GPO;
* "bundled": the bundled model's own image GPO (trained on 7×7 grids, θ's mass on ranks 30–47 of
  49). Its θ is nowhere exactly zero, so no rank window can be skipped exactly: it is sorted fully.

Baselines, timed in the same rounds (each round runs every pool once, so a busy machine slows all
of them alike): masked max pooling (padding -inf, the cost GPO is held to), average pooling, GPO's
sort-and-sum with ``torch.sort`` (the previous spread path) and "naive" GPO (mask, ``torch.sort`` along
the set axis, autograd). Every GPO's outputs are compared with ``GPOReference`` (per sample, a
plain BiGRU and a full sort) loaded with the same weights. Medians of wall time and of the
process's CPU time are both reported: on a shared machine the CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

import vseinf
from vseinf.pooling import GPO, AvgPool, GPOReference, MaxPool, check_set_batch, kernels, valid_mask

BUNDLED = Path(vseinf.__file__).resolve().parent / "assets" / "flickr8k_effnet_minilm" / "model.safetensors"
BUNDLED_IMAGE_GPO = "image.image_encoder.gpool."


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


class TorchSortGPO(torch.nn.Module):
    """GPO with its θ, summed over ranks by the ``torch.sort`` path (one contiguous sort of B·D rows,
    scatter backward) instead of the numpy key sort: what the spread regime ran before."""

    def __init__(self, gpo: GPO):
        super().__init__()
        self.gpo = gpo

    def forward(self, features, lengths):
        lengths = check_set_batch(features, lengths)
        n_max = features.shape[1]
        sizes, inverse = torch.unique(lengths, return_inverse=True)
        weights = self.gpo.coefficients(sizes, n_max)[inverse]
        return kernels._SortedWeightedSum.apply(features, weights, valid_mask(lengths, n_max)), weights


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


def bundled_image_gpo() -> GPO | None:
    if not BUNDLED.is_file():
        return None
    from safetensors.torch import load_file

    state = {k[len(BUNDLED_IMAGE_GPO):]: v for k, v in load_file(BUNDLED).items() if k.startswith(BUNDLED_IMAGE_GPO)}
    gpo = GPO()
    gpo.load_state_dict(state, strict=True)
    return gpo


def step(pool, features, lengths, device) -> tuple[float, float]:
    """One forward + backward; (wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    x = features.detach().requires_grad_(True)
    pooled, _ = pool(x, lengths)
    pooled.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_round_robin(pools: dict, features, lengths, repeats: int, device) -> dict:
    """Median wall and CPU time of each pool, the pools interleaved in every round."""
    for pool in pools.values():
        for _ in range(2):
            step(pool, features, lengths, device)
    samples = {name: [] for name in pools}
    for _ in range(repeats):
        for name, pool in pools.items():
            samples[name].append(step(pool, features, lengths, device))
    return {name: {"wall": statistics.median(s[0] for s in runs), "cpu": statistics.median(s[1] for s in runs)}
            for name, runs in samples.items()}


def theta_profile(gpo: GPO, n: int) -> dict:
    with torch.no_grad():
        theta = gpo.coefficients(torch.tensor([n]), n)[0].double().cpu()
    top = theta.argsort(descending=True)
    held = int((theta[top].cumsum(0) < 0.9).sum()) + 1
    return {"N": n, "min": float(theta.min()), "max": float(theta.max()),
            "ranks_holding_90pct": [int(top[:held].min()), int(top[:held].max())]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
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
    bundled = bundled_image_gpo()
    if bundled is not None:
        regimes["bundled"] = bundled
    results = {"device": device, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "load_average_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "cases": []}
    if bundled is not None:
        results["bundled_theta"] = [theta_profile(bundled, n) for n in (36, 49, 256)]
    for shape_name, (b, n, d) in shapes.items():
        features = torch.randn(b, n, d, device=device)
        lengths = torch.randint(max(1, n // 2), n + 1, (b,), device=device)
        lengths[0] = n
        for regime, gpo in regimes.items():
            gpo = gpo.to(device)
            pools = {"max": MaxPool(), "gpo": gpo, "gpo_torch_sort": TorchSortGPO(gpo), "naive": NaiveGPO(gpo),
                     "avg": AvgPool()}
            with torch.no_grad():
                fast_out, _ = gpo(features, lengths)
                naive_out, _ = pools["naive"](features, lengths)
                err = {"vs_naive": float((fast_out - naive_out).abs().max())}
                if regime != "concentrated":  # GPOReference has the plain generator only
                    reference = GPOReference().to(device)
                    reference.load_state_dict(gpo.state_dict(), strict=True)
                    err["vs_reference"] = float((fast_out - reference(features, lengths)[0]).abs().max())
            t = time_round_robin(pools, features, lengths, repeats, device)
            case = {
                "shape": shape_name, "B": b, "N": n, "D": d, "regime": regime,
                "seconds_wall": {k: v["wall"] for k, v in t.items()},
                "seconds_cpu": {k: v["cpu"] for k, v in t.items()},
                "gpo_over_max_wall": t["gpo"]["wall"] / t["max"]["wall"],
                "gpo_over_max_cpu": t["gpo"]["cpu"] / t["max"]["cpu"],
                "torch_sort_over_max_wall": t["gpo_torch_sort"]["wall"] / t["max"]["wall"],
                "naive_over_gpo_wall": t["naive"]["wall"] / t["gpo"]["wall"],
                "max_abs_error": err,
            }
            results["cases"].append(case)
            print(f"{shape_name:8s} {regime:12s} gpo {t['gpo']['wall']*1e3:8.1f} ms  max {t['max']['wall']*1e3:7.1f} ms"
                  f"  gpo/max wall {case['gpo_over_max_wall']:4.2f} cpu {case['gpo_over_max_cpu']:4.2f}"
                  f"  torch.sort path/max {case['torch_sort_over_max_wall']:4.2f}"
                  f"  naive/gpo {case['naive_over_gpo_wall']:4.2f}  err {err}", flush=True)
    results["load_average_after"] = os.getloadavg()
    emit(results, args.out)


if __name__ == "__main__":
    main()
