"""Live JPEGs with 0, 1, 2… decoding worker processes: fine-tuning the CNN, and `vseinf encode`.

    python benchmarks/live_images.py [--data ../shared/data/flickr8k] [--workers 0,1,2] [--device cuda]
                                     [--image-size 224] [--batch-size 32] [--steps 8] [--out FILE.json]

With the CNN trained end to end (``--finetune_backbone true``, the paper's grid recipe) every step
decodes, crops and resizes a batch of photos. ``vseinf train`` hands that to ``data.num_workers``
processes (``vseinf.data.images.image_batch_loader``) which prepare the next batches while the model
trains on this one. This measures, on the real Flickr8k train photos (cycled when ``--steps`` needs
more), the decode rate alone and the training rate (MobileNetV2 + GPO head, cached-token text side of
random features, AdamW, bf16 autocast on CPU), per worker count, against 0 workers in the same run.
The ``encode`` rows time ``vseinf.search.build.encode_image_files`` (what ``vseinf encode --workers N``
runs) over ``--encode-images`` photos. Where the accelerator is fast (a GPU) decoding is the
bottleneck and workers pay most; on a 2-core CPU they compete with the model's own threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

from vseinf.config import ModelConfig
from vseinf.data.images import ImageBatches, ImageDataset, image_batch_loader
from vseinf.data.splits import open_split
from vseinf.losses import VSELoss
from vseinf.model import VSEModel
from vseinf.search.build import encode_image_files


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def batches_of(split, steps: int, batch_size: int):
    n = split.n_images
    return [[(s * batch_size + j) % n for j in range(batch_size)] for s in range(steps)]


def decode_rate(dataset, batches, workers: int) -> float:
    loader = image_batch_loader(ImageBatches(dataset, batches, seed_key=(0, 0, 0)), workers)
    it = iter(loader)
    next(it)  # workers started, first batch ready
    t0 = time.perf_counter()
    n = sum(len(keep) for _, keep in it)
    return n / (time.perf_counter() - t0)


def train_rate(model, dataset, batches, workers: int, device, precision: str) -> float:
    loss_fn = VSELoss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    hidden = model.text.hidden_size
    loader = image_batch_loader(ImageBatches(dataset, batches, seed_key=(0, 0, 0)), workers,
                                pin_memory=device.type == "cuda")
    it = iter(loader)

    def step(pixels):
        bs = pixels.shape[0]
        txt = torch.randn(bs, 16, hidden, device=device)
        lengths = torch.full((bs,), 16, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            img_emb, _ = model.image(pixels.to(device, non_blocking=True))
            txt_emb, _ = model.embed_text_features(txt, lengths)
        loss = loss_fn(img_emb.float(), txt_emb.float(), torch.arange(bs, device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(next(it)[0])  # warm-up (and the workers' start) outside the timing
    sync(device)
    t0 = time.perf_counter()
    pairs = 0
    for pixels, keep in it:
        step(pixels)
        pairs += len(keep)
    sync(device)
    return pairs / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("VSEINF_FLICKR8K", "../shared/data/flickr8k"))
    p.add_argument("--split", default="train")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed steps per worker count (after one warm-up)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--encode-images", type=int, default=512, help="photos embedded per worker count (0: skip)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    split = open_split(args.data, args.split)
    model = VSEModel(ModelConfig(image_encoder="grid", image_size=args.image_size)).to(device).train()
    model.image.set_backbone_trainable(True)
    dataset = ImageDataset(split, model.image_transform(train=True))
    batches = batches_of(split, args.steps + 1, args.batch_size)
    rows = []
    for w in args.workers:
        decode = decode_rate(dataset, batches, w)
        train = train_rate(model, dataset, batches, w, device, args.precision)
        rows.append({"workers": w, "decode_images_per_sec": round(decode, 1), "train_pairs_per_sec": round(train, 2)})
        print(f"workers {w}: decode {decode:7.1f} images/s   train {train:6.2f} pairs/s", flush=True)
    base = rows[0]["train_pairs_per_sec"]
    for r in rows:
        r["train_speedup_vs_first"] = round(r["train_pairs_per_sec"] / base, 2)
    encode_rows = []
    if args.encode_images:
        model.eval()
        paths = [split.image_path(i % split.n_images) for i in range(args.encode_images)]
        encode_image_files(model, paths[:args.batch_size], args.batch_size, workers=0)  # warm-up
        for w in args.workers:
            sync(device)
            t0 = time.perf_counter()
            encode_image_files(model, paths, args.batch_size, workers=w)
            rate = len(paths) / (time.perf_counter() - t0)
            encode_rows.append({"workers": w, "images_per_sec": round(rate, 1)})
            print(f"encode, workers {w}: {rate:7.1f} images/s", flush=True)
        for r in encode_rows:
            r["speedup_vs_first"] = round(r["images_per_sec"] / encode_rows[0]["images_per_sec"], 2)
    result = {
        "benchmark": "live_images", "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "data": str(args.data), "split": args.split, "images_in_split": split.n_images,
        "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
        "precision": args.precision, "backbone": "mobilenet_v2 (fine-tuned)", "rows": rows,
        "encode": {"images": args.encode_images, "precision": "fp32", "rows": encode_rows},
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
