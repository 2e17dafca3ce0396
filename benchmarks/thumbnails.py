"""Time and peak memory of parallel first requests for the thumbnail of one very large photo.

    python benchmarks/thumbnails.py [--megapixels 144] [--requests 4] [--out FILE.json]

Writes one large JPEG (``--megapixels``) and one PNG of a third of that size in a temporary folder,
then, for each file, asks for its 256-px thumbnail from ``--requests`` threads at once, in a fresh
process per measurement so its peak resident memory (``VmHWM``) is its own:

- ``naive``: what the server did before — every request decodes the photo, turns it upright and to
  RGB at full size, then shrinks it (a JPEG draft, but full-size copies after it);
- ``maker``: :class:`vseinf.thumbnails.ThumbnailMaker` — one decode per photo however many ask,
  at most two at a time, decoded small (draft / reduce) and only then turned upright and RGB;
- ``stored``: reading the thumbnail ``vseinf encode`` stored in the index (a few KB), for scale.

Ratios are against ``naive`` in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import emit  # benchmarks/ is on sys.path when run as a script

CHILD = r"""
import concurrent.futures, io, json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from _procstatus import status_mb
from PIL import Image, ImageOps
Image.MAX_IMAGE_PIXELS = None  # the photo is the user's own; this measures memory, not the bomb check
variant, path, requests = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])

def naive(p):
    with Image.open(p) as im:
        im.draft("RGB", (256, 256))
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((256, 256))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
    return buf.getvalue()

if variant == "maker":
    from vseinf.thumbnails import ThumbnailMaker
    get = ThumbnailMaker().get
elif variant == "stored":  # written by the parent, as `vseinf encode` would have
    get = lambda p: p.with_suffix(".thumb.jpg").read_bytes()
else:
    get = naive
base = status_mb("VmRSS")
t0 = time.perf_counter()
with concurrent.futures.ThreadPoolExecutor(requests) as pool:
    sizes = [len(b) for b in pool.map(get, [path] * requests)]
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_mb": status_mb("VmHWM"), "start_mb": base, "bytes": sizes[0]}))
"""


def make_photos(folder: Path, megapixels: float) -> dict[str, Path]:
    """A smooth RGB photo of ``megapixels`` as JPEG, and one of a third of that as PNG."""
    import numpy as np
    from PIL import Image

    def photo(mp: float) -> Image.Image:
        side = int((mp * 1e6) ** 0.5)
        x = np.linspace(0, 255, side, dtype=np.float32)
        row = np.stack([x, x[::-1], np.full_like(x, 128)], axis=1).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.broadcast_to(row[None], (side, side, 3))))

    Image.MAX_IMAGE_PIXELS = None
    photo(megapixels).save(folder / "large.jpg", quality=85)
    photo(megapixels / 3).save(folder / "large.png", compress_level=1)
    return {"jpeg": folder / "large.jpg", "png": folder / "large.png"}


def measure(variant: str, path: Path, requests: int) -> dict:
    here = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", CHILD, variant, str(path), str(requests), str(here)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megapixels", type=float, default=144.0)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp), args.megapixels)
        for kind, path in photos.items():
            from vseinf.thumbnails import thumbnail_jpeg

            path.with_suffix(".thumb.jpg").write_bytes(thumbnail_jpeg(path))
            rows[kind] = {v: measure(v, path, args.requests) for v in ("naive", "maker", "stored")}
            for v in ("maker", "stored"):
                rows[kind][v]["speedup_vs_naive"] = rows[kind]["naive"]["seconds"] / rows[kind][v]["seconds"]
                rows[kind][v]["peak_memory_vs_naive"] = rows[kind][v]["peak_mb"] / rows[kind]["naive"]["peak_mb"]
    emit({"benchmark": "thumbnails", "megapixels": {"jpeg": args.megapixels, "png": args.megapixels / 3},
          "requests": args.requests, "machine": platform.processor() or platform.machine(), "results": rows},
         args.out)


if __name__ == "__main__":
    main()
