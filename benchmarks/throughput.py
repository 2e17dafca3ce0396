"""Training and encoding throughput, beside the machine's measured matrix-multiply rate.

    python benchmarks/throughput.py [--quick] [--device cuda] [--out FILE.json]

Training: image–caption pairs per second of one optimisation step (forward, backward, AdamW) for
three configurations — region features (36 × 2048, the BUTD shape), cached grid features (7 × 7 ×
1280, MobileNetV2 at 224 px) with cached MiniLM tokens, and cached grid features with the live MiniLM
transformer (fine-tuned) — at several batch sizes, in fp32 and bf16 autocast.
Encoding: images per second through MobileNetV2 + head and captions per second through MiniLM +
head, and the FLOP rate that implies, as a fraction of the measured dense matmul peak.
Inputs are random tensors of the real shapes, so no dataset is needed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

from vseinf.config import ModelConfig
from vseinf.losses import VSELoss
from vseinf.model import VSEModel


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device, dtype, n=2048, repeats=5):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, repeats, device)
    return 2 * n ** 3 / sec


def train_step_fn(model, loss_fn, opt, batch, device, precision, live_text=None):
    img_feats, img_len, txt_feats, txt_len = batch
    ids = torch.arange(img_feats.shape[0], device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            a, _ = model.embed_image_features(img_feats, img_len)
            if live_text is not None:
                b, _ = model.embed_tokens(*live_text)
            else:
                b, _ = model.embed_text_features(txt_feats, txt_len)
        loss = loss_fn(a.float(), b.float(), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_training(device, batch_sizes, repeats, precisions):
    rows = []
    configs = {
        "region": dict(cfg=ModelConfig(image_encoder="region", feature_dim=2048), set_shape=(36, 2048)),
        "cached_grid": dict(cfg=ModelConfig(image_encoder="grid", image_size=224), set_shape=(49, 1280)),
        "grid_live_transformer": dict(cfg=ModelConfig(image_encoder="grid", image_size=224), set_shape=(49, 1280),
                                      live_text=True),
    }
    for name, spec in configs.items():
        model = VSEModel(spec["cfg"]).to(device).train()
        loss_fn = VSELoss()
        live = spec.get("live_text", False)
        params = [p for n, p in model.named_parameters() if not n.startswith("image.backbone.")
                  and (live or not n.startswith("text.bert."))]
        opt = torch.optim.AdamW(params, lr=1e-4)
        hidden = model.text.hidden_size
        for bs in batch_sizes:
            n, c = spec["set_shape"]
            img = torch.randn(bs, n, c, device=device)
            img_len = torch.full((bs,), n, device=device)
            txt = torch.randn(bs, 16, hidden, device=device)
            txt_len = torch.randint(8, 17, (bs,), device=device)
            live_text = None
            if live:
                ids = torch.randint(1000, 20000, (bs, 16), device=device)
                ids[:, 0], ids[:, -1] = 101, 102
                live_text = (ids, torch.full((bs,), 16, device=device))
            for precision in precisions:
                step = train_step_fn(model, loss_fn, opt, (img, img_len, txt, txt_len), device, precision, live_text)
                sec = timed(step, repeats, device)
                rows.append({"config": name, "batch_size": bs, "precision": precision, "sec_per_step": sec,
                             "pairs_per_sec": bs / sec})
                print(f"train {name:22s} bs {bs:4d} {precision}: {bs / sec:8.1f} pairs/s", flush=True)
    return rows


@torch.no_grad()
def bench_encoding(device, repeats, peak):
    out = {}
    model = VSEModel(ModelConfig(image_encoder="grid", image_size=224)).to(device).eval()
    images = torch.randn(32, 3, 224, 224, device=device)
    sec = timed(lambda: model.image(images), repeats, device)
    # MobileNetV2 at 224 px: 0.30 GFLOPs multiply-adds → 0.60 GFLOP; head ≈ 2·49·1280·1024
    flops_per_image = 0.60e9 + 2 * 49 * 1280 * 1024
    out["images_per_sec"] = 32 / sec
    out["image_gflops_per_sec"] = 32 * flops_per_image / sec / 1e9
    out["image_fraction_of_peak"] = 32 * flops_per_image / sec / peak
    captions = ["a dog runs along the beach chasing a red ball"] * 128
    ids, lengths = model.tokenize(captions)
    ids, lengths = ids.to(device), lengths.to(device)
    sec = timed(lambda: model.embed_tokens(ids, lengths), repeats, device)
    layers = model.text.bert.config.num_hidden_layers
    hidden = model.text.hidden_size
    seq = ids.shape[1]
    # per token per layer: ≈ 24·h² (QKV, output, 4h MLP) + 4·seq·h (attention)
    flops_per_caption = seq * layers * (24 * hidden ** 2 + 4 * seq * hidden) + 2 * seq * hidden * 1024
    out["captions_per_sec"] = 128 / sec
    out["text_gflops_per_sec"] = 128 * flops_per_caption / sec / 1e9
    out["text_fraction_of_peak"] = 128 * flops_per_caption / sec / peak
    print(f"encode: {out['images_per_sec']:.1f} images/s ({out['image_fraction_of_peak']:.1%} of peak), "
          f"{out['captions_per_sec']:.1f} captions/s ({out['text_fraction_of_peak']:.1%} of peak)", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="one batch size, fewer repeats")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    repeats = 2 if args.quick else 4
    batch_sizes = [32] if args.quick else [32, 64, 128, 256]
    precisions = ["fp32", "bf16"]
    peak32 = matmul_peak(device, torch.float32)
    peak16 = matmul_peak(device, torch.bfloat16)
    print(f"matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s", flush=True)
    result = {
        "device": str(device), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "matmul_gflops": {"fp32": peak32 / 1e9, "bf16": peak16 / 1e9},
        "training": bench_training(device, batch_sizes, repeats, precisions),
        "encoding": bench_encoding(device, repeats, peak32),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
