"""Copy the first N train and dev images of Flickr8k, with their captions, into a small folder of
the same layout: what tests/test_cuda.py trains on when the full dataset cannot travel (a lent GPU
machine receives at most 64 MiB).

    python benchmarks/gpu/mini_flickr8k.py ../shared/data/flickr8k .gpu/data/flickr8k --train 48 --dev 24
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

IMAGES = "Flicker8k_Dataset"  # sic: the dataset's own spelling
TEXT = "Flickr8k_text"
SPLITS = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt"}
TOKENS = "Flickr8k.token.txt"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--train", type=int, default=48)
    p.add_argument("--dev", type=int, default=24)
    args = p.parse_args(argv)
    (args.dest / IMAGES).mkdir(parents=True, exist_ok=True)
    (args.dest / TEXT).mkdir(parents=True, exist_ok=True)
    kept = set()
    for split, count in (("train", args.train), ("dev", args.dev)):
        names = (args.source / TEXT / SPLITS[split]).read_text().split()[:count]
        (args.dest / TEXT / SPLITS[split]).write_text("".join(f"{n}\n" for n in names))
        kept.update(names)
    lines = [line for line in (args.source / TEXT / TOKENS).read_text().splitlines()
             if line.split("#", 1)[0] in kept]
    (args.dest / TEXT / TOKENS).write_text("\n".join(lines) + "\n")
    for name in sorted(kept):
        shutil.copyfile(args.source / IMAGES / name, args.dest / IMAGES / name)
    print(f"{args.dest}: {len(kept)} images, {len(lines)} captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
