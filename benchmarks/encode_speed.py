"""Images per second of `vseinf encode` on a CPU: the model's own tower against its inference copy
(BatchNorm folded into the convolutions, channels-last), in one run, on real photos.

    python benchmarks/encode_speed.py [--photos DIR] [--n 128] [--repeats 3] [--batch-size 32]
                                      [--rsum] [--out results.json]

Sections (one JSON document on stdout, and in --out):

- ``model``: the image tower alone on photos decoded beforehand (batches of ``--batch-size``):
  ``reference`` (``model.image`` under ``torch.no_grad``: what encode ran before), then one change
  at a time — ``inference_mode``, ``channels_last``, ``fused`` (BatchNorm folded) — and
  ``fast`` (``model.image.for_inference()`` under ``torch.inference_mode``: both, what encode runs
  now), also at twice the batch size.
- ``bf16``: the fast tower under bf16 autocast, timed once on ``--bf16-images`` photos (on a CPU
  without native bf16 it is a slow fallback: here for its accuracy, and to show how slow).
- ``encode``: :func:`vseinf.search.build.encode_image_files` end to end (decoding, resizing, model), as
  ``vseinf encode`` runs it on a CPU: ``reference`` (``reference=True``: the model's own tower,
  photos decoded between batches on the model's thread — what encode ran before) against ``fast``
  (the default: the inference copy, a thread decoding the next batch), also at twice the batch
  size; and ``fast_decode_inline`` (the fast tower, photos decoded on the model's thread, written
  here) to separate the two changes.
- ``accuracy``: cosine between each photo's fast and reference embeddings (and bf16's).
- ``rsum`` (with ``--rsum``): Flickr8k dev (1,000 photos, 5,000 captions) R@K and RSUM with the
  reference embeddings and with the fast ones.

Each variant runs once per repetition, in turn, so all share whatever else the machine is doing;
reported: images/s from the median wall time, and CPU milliseconds per image (the process's
user + system time over all its threads: steadier than wall time on a shared machine), and
speed-ups of medians against ``reference``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

from vseinf.data.images import DecodedImageBatches, load_rgb
from vseinf.encoders.cnn import fuse_conv_bn
from vseinf.encoders.image import GridHead
from vseinf.model import load_model
from vseinf.precision import bf16_is_fast
from vseinf.search.build import encode_image_files


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "?"
    have = set(flags.split(":", 1)[1].split())
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have) or "none of avx2/avx512"


def measure(fn) -> tuple[float, float]:
    """(wall s, CPU s) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


class Tower(torch.nn.Module):
    """A grid tower variant made of a backbone and the model's head (for one-change-at-a-time rows)."""

    def __init__(self, backbone, head, channels_last: bool):
        super().__init__()
        self.backbone, self.head, self.channels_last = backbone, head, channels_last

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(GridHead.flatten(self.backbone(x)))


def run_batches(tower, pixels: torch.Tensor, batch: int, context=torch.inference_mode, autocast: bool = False):
    def fn():
        out = []
        with context(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for s in range(0, len(pixels), batch):
                out.append(tower(pixels[s:s + batch])[0].float())
        return torch.cat(out)
    return fn


def encode_decode_inline(model, paths, batch_size: int) -> np.ndarray:
    """The fast tower with each batch decoded on the model's thread, between batches."""
    batches = DecodedImageBatches(paths, model.image_transform(train=False), batch_size)
    tower = model.image.for_inference()
    out = []
    for k in range(len(batches)):
        pixels, _, _ = batches[k]
        with torch.inference_mode():
            out.append(tower(pixels)[0].numpy())
    return np.concatenate(out)


def cosines(a, b) -> dict:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    c = torch.nn.functional.cosine_similarity(a.double(), b.double())
    return {"min": round(c.min().item(), 7), "mean": round(c.mean().item(), 7)}


def summarise(times: dict[str, list[tuple[float, float]]], n_images: int, base: str) -> dict:
    rows = {}
    base_wall = statistics.median(w for w, _ in times[base])
    base_cpu = statistics.median(c for _, c in times[base])
    for name, t in times.items():
        wall, cpu = statistics.median(w for w, _ in t), statistics.median(c for _, c in t)
        rows[name] = {"images_per_s": round(n_images / wall, 2), "cpu_ms_per_image": round(1000 * cpu / n_images, 1),
                      "speedup_wall": round(base_wall / wall, 2), "speedup_cpu": round(base_cpu / cpu, 2),
                      "wall_s_all": [round(w, 2) for w, _ in t]}
    return rows


def dev_rsum(model, root: Path, batch_size: int) -> dict:
    from vseinf.data.splits import open_split
    from vseinf.eval.metrics import retrieval_metrics_from_embeddings

    split = open_split(root, "dev")
    paths = [split.image_root / k for k in split.image_keys]
    log(f"rsum: {len(paths)} dev photos, {len(split.captions)} captions")
    text = model.encode_texts(split.captions).numpy()
    out = {}
    for name, ref in (("reference", True), ("fast", False)):
        emb, kept, skipped = encode_image_files(model, paths, batch_size=batch_size, reference=ref)
        assert not skipped and len(kept) == len(paths)
        out[name] = {k: round(v, 2) for k, v in retrieval_metrics_from_embeddings(emb, text, split.caption_to_image).items()}
        out[f"{name}_images"] = emb
    out["cosine_fast_vs_reference"] = cosines(out.pop("fast_images"), out.pop("reference_images"))
    out["rsum_difference"] = round(out["fast"]["rsum"] - out["reference"]["rsum"], 2)
    return out


def main() -> None:
    shared = Path(os.environ.get("VSEINF_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared/data")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flickr8k", default=str(shared / "flickr8k"), help="Flickr8k folder (photos, dev split)")
    ap.add_argument("--n", type=int, default=128, help="photos timed per variant")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bf16-images", type=int, default=4, help="photos for the bf16 row (0: skip it)")
    ap.add_argument("--rsum", action="store_true", help="also Flickr8k dev R@K/RSUM, reference vs fast")
    ap.add_argument("--out")
    args = ap.parse_args()

    root = Path(args.flickr8k)
    photos = sorted((root / "Flicker8k_Dataset").glob("*.jpg"))[: args.n]
    if len(photos) < args.n:
        sys.exit(f"need {args.n} photos in {root / 'Flicker8k_Dataset'}, found {len(photos)}")
    model = load_model()
    tf = model.image_transform(train=False)
    pixels = torch.stack([tf(load_rgb(p)) for p in photos])
    b = args.batch_size
    tower = model.image
    head = tower.image_encoder
    unfused_cl = Tower(copy.deepcopy(tower.backbone).to(memory_format=torch.channels_last), head, True)
    fused_nchw = Tower(fuse_conv_bn(tower.backbone), head, False)
    fast = tower.for_inference()
    model_variants = {
        "reference": run_batches(tower, pixels, b, torch.no_grad),
        "inference_mode": run_batches(tower, pixels, b),
        "channels_last": run_batches(unfused_cl, pixels, b),
        "fused": run_batches(fused_nchw, pixels, b),
        "fast": run_batches(fast, pixels, b),
        f"fast_batch{2 * b}": run_batches(fast, pixels, 2 * b),
    }
    encode_variants = {
        "reference": lambda: encode_image_files(model, photos, batch_size=b, reference=True)[0],
        "fast": lambda: encode_image_files(model, photos, batch_size=b)[0],
        f"fast_batch{2 * b}": lambda: encode_image_files(model, photos, batch_size=2 * b)[0],
        "fast_decode_inline": lambda: encode_decode_inline(model, photos, b),
    }
    log("warm-up and accuracy …")
    ref = model_variants["reference"]()
    accuracy = {name: cosines(fn(), ref) for name, fn in model_variants.items() if name != "reference"}
    enc_ref = encode_variants["reference"]()
    accuracy["encode_fast_vs_reference"] = cosines(encode_variants["fast"](), enc_ref)
    accuracy["encode_decode_inline_vs_reference"] = cosines(encode_variants["fast_decode_inline"](), enc_ref)
    accuracy["encode_reference_vs_model_reference"] = cosines(enc_ref, ref)

    model_times = {n: [] for n in model_variants}
    encode_times = {n: [] for n in encode_variants}
    for r in range(args.repeats):
        for name, fn in model_variants.items():
            model_times[name].append(measure(fn))
        for name, fn in encode_variants.items():
            encode_times[name].append(measure(fn))
        log(f"repeat {r + 1}/{args.repeats}: model " + ", ".join(f"{n} {t[-1][0]:.1f}s" for n, t in model_times.items())
            + "; encode " + ", ".join(f"{n} {t[-1][0]:.1f}s" for n, t in encode_times.items()))
    bf16 = None
    if args.bf16_images > 0:
        n16 = min(args.bf16_images, len(pixels))
        log(f"bf16 autocast on {n16} photos …")
        out16 = []
        wall, cpu = measure(lambda: out16.append(run_batches(fast, pixels[:n16], b, autocast=True)()))
        ref_wall = statistics.median(w for w, _ in model_times["reference"]) * n16 / len(pixels)
        bf16 = {"images": n16, "images_per_s": round(n16 / wall, 3), "cpu_ms_per_image": round(1000 * cpu / n16, 1),
                "speedup_wall_vs_reference": round(ref_wall / wall, 3),
                "cosine_to_reference": cosines(out16[0], ref[:n16])}
    result = {
        "benchmark": "encode_speed",
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
                    "bf16_native": bf16_is_fast("cpu"), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "model": f"bundled ({model.config.backbone} at {model.config.image_size} px + {model.config.image_pooling} head)",
        "photos": f"{len(photos)} Flickr8k photos ({root})",
        "batch_size": b,
        "repeats": args.repeats,
        "model_only": summarise(model_times, len(photos), "reference"),
        "encode": summarise(encode_times, len(photos), "reference"),
        "accuracy_cosine_to_reference": accuracy,
        "bf16": bf16,
    }
    if args.rsum:
        result["rsum"] = dev_rsum(model, root, b)
    emit(result, args.out)


if __name__ == "__main__":
    main()
