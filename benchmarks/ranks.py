"""Time the counting rank evaluation against the per-query argsort evaluation.

The shape is COCO 5K's: 5,000 images × 25,000 captions (5 per image) of random float64 scores.
Both evaluations must give identical per-query ranks and top-1 indices (random float64 scores
have no ties); the script fails otherwise. Prints one JSON object and, with --out, writes it to
a file.

    python benchmarks/ranks.py              # COCO-5K shape, CPU
    python benchmarks/ranks.py --quick      # 1,000 × 5,000
    python benchmarks/ranks.py --device cuda
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

from vseinf.evaluation import rank_details, rank_details_reference

FIELDS = ("i2t_ranks", "i2t_top1", "t2i_ranks", "t2i_top1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_fast(sims: torch.Tensor, t2i: np.ndarray, chunk_size: int, repeats: int):
    """Best wall time of ``repeats`` runs (after one warm-up run) and the last result."""
    details = rank_details(sims, t2i, chunk_size)  # warm-up: allocator, kernels, caches
    best = float("inf")
    for _ in range(repeats):
        _sync(sims.device)
        start = time.perf_counter()
        details = rank_details(sims, t2i, chunk_size)
        _sync(sims.device)
        best = min(best, time.perf_counter() - start)
    return best, details


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1,000 × 5,000 instead of 5,000 × 25,000"
    )
    parser.add_argument("--device", default="cpu", help="where the fast routine runs (cpu, cuda)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="image rows per block")
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast routine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    n_images = 1000 if args.quick else 5000
    n_texts = n_images * args.captions

    gen = torch.Generator().manual_seed(args.seed)
    # float64: 125M float32 uniforms would repeat values (2^24 levels), and on exact ties the
    # argsort order and the counting legitimately differ. float64 scores have no ties.
    sims_cpu = torch.rand(n_images, n_texts, generator=gen, dtype=torch.float64)
    t2i = np.repeat(np.arange(n_images), args.captions)  # COCO order: an image's captions together
    sims = sims_cpu.to(device)

    fast_s, fast = _time_fast(sims, t2i, args.chunk_size, args.repeats)
    start = time.perf_counter()
    ref = rank_details_reference(sims_cpu.numpy(), t2i)
    reference_s = time.perf_counter() - start

    mismatched = [f for f in FIELDS if not np.array_equal(getattr(fast, f), getattr(ref, f))]
    result = {
        "benchmark": "retrieval ranks: counting vs per-query argsort",
        "shape": [n_images, n_texts],
        "captions_per_image": args.captions,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(sims.dtype).replace("torch.", ""),
        "chunk_size": args.chunk_size,
        "fast_s": round(fast_s, 4),
        "reference_s": round(reference_s, 4),
        "speedup": round(reference_s / fast_s, 1),
        "same_results": not mismatched,
        "metrics": {k: round(v, 4) for k, v in fast.metrics().items()},
        "torch": torch.__version__,
    }
    emit(result, args.out)
    if mismatched:
        print(f"error: fast and reference ranks differ in {', '.join(mismatched)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
