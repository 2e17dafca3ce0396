"""Resident memory while streaming a precomputed feature file much larger than a batch.

    python benchmarks/memmap_stream.py [--gb 2] [--out FILE.json]

Writes a precomp-layout ``train_ims.npy`` (N × 36 × 2048 float32) of the requested size in a
temporary folder, opens it with ``vseinf.data.read_precomp`` (memory-mapped) and reads random batches
of 128 through the training feature source until the whole file has been read several times over.
Reports the process's resident memory (RSS, from /proc) before, during and after: it stays flat —
pages of a read-only memory map are evictable cache, not the process's own memory — while the same
file loaded with ``np.load`` would cost its full size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def anon_mb() -> float:
    """Anonymous (non-file-backed) resident memory: what the process really owns."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the feature file")
    parser.add_argument("--passes", type=float, default=3.0, help="read the file this many times over")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from vseinf.data import read_precomp
    from vseinf.features import ArraySets

    per_image = 36 * 2048 * 4
    n = int(args.gb * 1e9 / per_image)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        arr = np.lib.format.open_memmap(root / "train_ims.npy", mode="w+", dtype=np.float32, shape=(n, 36, 2048))
        for start in range(0, n, 512):
            arr[start:start + 512] = np.random.default_rng(start).standard_normal(
                (min(512, n - start), 36, 2048), dtype=np.float32)
        arr.flush()
        del arr
        (root / "train_caps.txt").write_text("".join(f"caption {i}\n" for i in range(n)))
        start_rss, start_anon = rss_mb(), anon_mb()
        split = read_precomp(root, "train")
        source = ArraySets(split.features)
        rng = np.random.default_rng(0)
        batches = int(args.passes * n / 128)
        peak_anon, samples = start_anon, []
        t0 = time.time()
        for b in range(batches):
            feats, _ = source.batch(rng.choice(n, 128, replace=False))
            del feats
            if b % max(1, batches // 20) == 0:
                samples.append({"batch": b, "rss_mb": rss_mb(), "anon_mb": anon_mb()})
                peak_anon = max(peak_anon, anon_mb())
        result = {
            "file_mb": n * per_image / 1e6, "items": n, "batches": batches, "batch_mb": 128 * per_image / 1e6,
            "seconds": time.time() - t0, "start_rss_mb": start_rss, "start_anon_mb": start_anon,
            "peak_anon_mb": peak_anon, "anon_growth_mb": peak_anon - start_anon, "samples": samples,
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
