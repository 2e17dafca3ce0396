"""Resident memory while streaming a precomputed feature file much larger than a batch.

    OMP_NUM_THREADS=1 python benchmarks/memmap_stream.py [--gb 2] [--passes 3] [--out FILE.json]

Writes a precomp-layout ``train_ims.npy`` (N × 36 × 2048 float32, the BUTD region layout) of the
requested size plus ``train_caps.txt`` (5 captions per image) in a temporary folder, opens it with
``vseinf.data.read_precomp`` (memory-mapped) and reads random batches of 128 images through the
training feature source (``vseinf.features.ArraySets``) until the whole file has been read
``--passes`` times over.

The process's memory is read from ``/proc/self/status`` after every batch, while the batch is
still alive: ``RssAnon`` (anonymous memory, what the process owns and what would run a machine out
of memory) and ``RssFile`` (file pages mapped in — page cache the kernel may evict at any time,
shared with every other reader of the file). The claim is that ``RssAnon`` stays flat, about a
batch or two above its starting value, however much of the file has been read; ``RssFile`` grows
towards the file size when the machine has spare memory, and that is the kernel's cache, not the
process's. For contrast the script then loads the same file with plain ``np.load`` (no mmap) and
records how much anonymous memory that costs (skip with ``--no-compare``).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from _procstatus import status_mb  # benchmarks/ is on sys.path when run as a script
from _report import emit

REGIONS, DIM, BATCH = 36, 2048, 128




def memory() -> dict:
    """Resident memory now: total, anonymous (owned) and file-backed (evictable page cache)."""
    return {"rss_mb": status_mb("VmRSS"), "anon_mb": status_mb("RssAnon"), "file_mb": status_mb("RssFile")}


def write_precomp(root: Path, n: int, progress: bool = True) -> Path:
    """A seeded ``train_ims.npy`` of ``n`` images and its 5-captions-per-image ``train_caps.txt``."""
    from tqdm.auto import tqdm

    path = root / "train_ims.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, REGIONS, DIM))
    step = 256
    for start in tqdm(range(0, n, step), desc="writing features", unit="chunk", disable=not progress):
        arr[start:start + step] = np.random.default_rng(start).standard_normal(
            (min(step, n - start), REGIONS, DIM), dtype=np.float32)
    arr.flush()
    del arr
    with open(root / "train_caps.txt", "w") as f:
        for i in range(n):
            f.write("".join(f"image {i} caption {k}\n" for k in range(5)))
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the feature file in GB (default 2)")
    parser.add_argument("--passes", type=float, default=3.0, help="read the file this many times over")
    parser.add_argument("--no-compare", action="store_true", help="skip the np.load (no mmap) comparison")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.gb <= 0 or args.passes <= 0:
        parser.error("--gb and --passes must be positive")
    from tqdm.auto import tqdm

    from vseinf.data import read_precomp
    from vseinf.features import ArraySets

    progress = not args.no_progress
    per_image = REGIONS * DIM * 4
    n = max(BATCH, int(args.gb * 1e9 / per_image))
    batch_mb = BATCH * per_image / 1e6
    with tempfile.TemporaryDirectory(prefix="vseinf-memmap-") as tmp:
        root = Path(tmp)
        write_precomp(root, n, progress)
        start = memory()
        split = read_precomp(root, "train")
        source = ArraySets(split.features)
        assert isinstance(split.features, np.memmap), "read_precomp did not memory-map the features"
        opened = memory()
        rng = np.random.default_rng(0)
        batches = int(np.ceil(args.passes * n / BATCH))
        peak = dict(start)
        samples, checksum = [], 0.0
        t0 = time.time()
        for b in tqdm(range(batches), desc="streaming batches", unit="batch", disable=not progress):
            feats, lengths = source.batch(rng.choice(n, BATCH, replace=False))
            checksum += float(feats[:, 0, 0].sum())  # touch the batch so nothing is optimised away
            now = memory()  # measured while the batch is alive
            for key in peak:
                peak[key] = max(peak[key], now[key])
            if b % max(1, batches // 25) == 0 or b == batches - 1:
                samples.append({"batch": b, "mb_read": round((b + 1) * batch_mb, 1), **now})
            del feats, lengths
        seconds = time.time() - t0
        end = memory()
        result = {
            "benchmark": "precomp features memory-mapped: resident memory while streaming",
            "file_mb": round(n * per_image / 1e6, 1), "items": n, "item_shape": [REGIONS, DIM],
            "batch_size": BATCH, "batch_mb": round(batch_mb, 1),
            "file_over_batch": round(n / BATCH, 1), "passes": args.passes, "batches": batches,
            "mb_read": round(batches * batch_mb, 1), "seconds": round(seconds, 2),
            "read_mb_per_s": round(batches * batch_mb / seconds, 1),
            "start": start, "after_open": opened, "peak": peak, "end": end,
            "anon_growth_peak_mb": round(peak["anon_mb"] - start["anon_mb"], 1),
            "anon_growth_end_mb": round(end["anon_mb"] - start["anon_mb"], 1),
            "file_pages_peak_mb": round(peak["file_mb"] - start["file_mb"], 1),
            "samples": samples,
            "note": "rss_mb = anon_mb + file_mb. anon_mb is the memory the process owns; file_mb counts the "
                    "file's pages mapped in, which are the kernel's page cache (shared, evicted under memory "
                    "pressure), so it grows towards the file size only while the machine has memory to spare.",
        }
        # "Flat": the process never owns more than a few batches' worth, whatever it has read.
        result["anon_flat"] = bool(result["anon_growth_peak_mb"] < 4 * batch_mb)
        del split, source
        if not args.no_compare:
            before = memory()["anon_mb"]
            loaded = np.load(root / "train_ims.npy", allow_pickle=False)
            result["np_load_anon_growth_mb"] = round(memory()["anon_mb"] - before, 1)
            del loaded
    result.update(python=platform.python_version(), numpy=np.__version__, machine=platform.machine(),
                  mem_total_mb=round(_meminfo_mb("MemTotal"), 0))
    emit(result, args.out)
    if not result["anon_flat"]:
        raise SystemExit(f"anonymous memory grew by {result['anon_growth_peak_mb']} MB while streaming "
                         f"(batch: {batch_mb:.1f} MB): the features are not being streamed")
    return result


def _meminfo_mb(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
