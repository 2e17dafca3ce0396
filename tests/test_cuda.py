"""The CUDA paths against the CPU references: GPO, the losses, the rank routine, exact search,
nccl process groups and training. Every test here skips on a machine without a GPU (CI); run them
where there is one: ``python -m pytest tests/test_cuda.py`` (benchmarks/gpu/run.sh does, on a lent
GPU machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def full_fp32():
    """Compare like with like: no TF32 in cuDNN (the GRU, convolutions) or matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("regime", ["fresh", "concentrated", "repeated"])
def test_gpo_on_cuda_equals_the_cpu_reference(regime):
    """All three fast-path regimes (full sort, top-K selection, θ shared by repeated sizes)."""
    from test_pooling import _fast_and_reference

    fast, ref, features, lengths = _fast_and_reference(regime)
    fast = fast.to(CUDA)
    probe = torch.randn(features.shape[0], features.shape[2], generator=torch.Generator().manual_seed(2))
    results = []
    for pool, device in ((fast, CUDA), (ref, torch.device("cpu"))):
        x = features.clone().to(device).requires_grad_(True)
        out, weights = pool(x, lengths.to(device))
        ((out * probe.to(device)).sum() + (weights ** 2).sum()).backward()
        grads = {n: p.grad.cpu() for n, p in pool.named_parameters()}
        results.append((out.detach().cpu(), weights.detach().cpu(), x.grad.cpu(), grads))
    (out_f, w_f, gx_f, gp_f), (out_r, w_r, gx_r, gp_r) = results
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(w_f, w_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx_f, gx_r, atol=1e-5, rtol=0)
    for name in gp_r:
        torch.testing.assert_close(gp_f[name], gp_r[name], atol=1e-4, rtol=1e-4, msg=name)


def test_gpo_under_bf16_autocast_on_cuda_keeps_fp32_coefficients():
    from vseinf.pooling import GPO

    torch.manual_seed(0)
    pool = GPO().to(CUDA)
    features = torch.randn(16, 49, 256, device=CUDA)
    lengths = torch.randint(20, 50, (16,), device=CUDA)
    out32, w32 = pool(features, lengths)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out16, w16 = pool(features.bfloat16(), lengths)
    # the generator ran in fp32: θ differs from fp32's only by its final rounding to bf16
    torch.testing.assert_close(w16.float(), w32, atol=1e-6, rtol=2 ** -8)
    torch.testing.assert_close(out16.float(), out32, atol=3e-2, rtol=3e-2)  # bf16 values: 8 mantissa bits


@pytest.mark.parametrize("kind", ["hinge", "warmup", "infonce"])
def test_losses_on_cuda_equal_the_loop_references(kind):
    from test_losses import IMAGE_IDS, LOGIT_SCALE, leaves, make_batch

    from vseinf.losses import hinge_triplet_loss, hinge_triplet_loss_reference, info_nce_loss, info_nce_loss_reference

    img, txt = make_batch()
    ids = torch.tensor(IMAGE_IDS)
    got, want = [], []
    for device, out in ((CUDA, got), (torch.device("cpu"), want)):
        a, b = leaves(img.to(device), txt.to(device))
        scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64, device=device, requires_grad=True)
        if kind == "infonce":
            fn = info_nce_loss if out is got else info_nce_loss_reference
            loss = fn(a, b, ids.to(device), scale)
            params = [a, b, scale]
        else:
            fn = hinge_triplet_loss if out is got else hinge_triplet_loss_reference
            loss = fn(a, b, ids.to(device), hardest=kind == "hinge")
            params = [a, b]
        grads = torch.autograd.grad(loss, params)
        out.extend([loss.detach().cpu(), *(g.cpu() for g in grads)])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_nccl_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """The global-batch gather with gradients over nccl. One GPU: a one-rank nccl group still runs
    every collective; two or more: the batch is split unevenly over two GPUs."""
    from test_losses import SPLIT, check_ranks_equal_one_process

    split = SPLIT if torch.cuda.device_count() >= 2 else (sum(SPLIT),)
    check_ranks_equal_one_process(tmp_path, "nccl", split)


@pytest.mark.parametrize("chunk_size", [17, 1024])
def test_rank_routine_on_cuda_equals_the_reference(chunk_size):
    from test_evaluation import assert_same_details, random_captions

    from vseinf.eval.metrics import rank_details_from_embeddings, rank_details_reference

    gen = torch.Generator().manual_seed(chunk_size)
    rng = np.random.default_rng(chunk_size)
    n_images = 300
    t2i = random_captions(rng, n_images, 1, 5)
    # float64: GPU and CPU sums differ in the last bits, which could flip a float32 near-tie
    img = F.normalize(torch.randn(n_images, 64, generator=gen, dtype=torch.float64), dim=1)
    noise = torch.randn(t2i.size, 64, generator=gen, dtype=torch.float64)
    txt = F.normalize(img[torch.from_numpy(t2i)] + 0.5 * noise, dim=1)
    ref = rank_details_reference(img @ txt.T, t2i)
    assert_same_details(rank_details_from_embeddings(img.to(CUDA), txt.to(CUDA), t2i, chunk_size=chunk_size), ref)


def test_rank_routine_on_cuda_breaks_ties_like_the_reference():
    from test_evaluation import assert_same_details, tie_heavy

    from vseinf.eval.metrics import rank_details, rank_details_reference

    sims, t2i = tie_heavy(np.random.default_rng(0), 300)
    ref = rank_details_reference(sims, t2i)
    assert_same_details(rank_details(torch.from_numpy(sims).to(CUDA), t2i, chunk_size=64), ref)


def test_exact_index_on_cuda_equals_the_reference():
    from vseinf.search.engines import ExactIndex, exact_search_reference

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((20_000, 32)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[rng.choice(len(gallery), 50, replace=False)] + 0.1 * rng.standard_normal((50, 32)).astype(
        np.float32)
    index = ExactIndex(gallery, chunk_rows=4096, device="cuda")
    assert index._rows.device.type == "cuda"
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = exact_search_reference(gallery, queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=0)


def test_training_on_cuda_in_bf16_gives_a_checkpoint_the_cpu_evaluates_alike(flickr8k_root, tmp_path, use_cache):
    """`torchrun --nproc_per_node 1 -m vseinf train` on the GPU with bf16 autocast; the best
    checkpoint, evaluated on the CPU, scores what the run recorded (up to a caption's rank
    flipping on float differences)."""
    from test_distributed import ARGS, TORCHRUN, _train

    # size augmentation on: its draws come from CPU generators and must reach GPU tensors
    args = [a for a in ARGS if a not in ("--precision", "fp32", "--size_augment", "false")]
    out = tmp_path / "run"
    _train([*TORCHRUN, "--nproc_per_node", "1", "--master_port", "29531", "-m", "vseinf", "train",
            "--data", str(flickr8k_root), "--out", str(out), "--batch_size", "16", "--no-progress",
            *args, "--precision", "bf16", "--size_augment", "true"], dict(os.environ))
    recorded = json.loads((out / "best" / "metrics.json").read_text())
    assert recorded["rsum"] > 0
    metrics = tmp_path / "cpu.json"
    _train([sys.executable, "-m", "vseinf", "eval", "--checkpoint", str(out / "best"), "--data", str(flickr8k_root),
            "--max-images", "12", "--device", "cpu", "--json", str(metrics)], dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    # 12 images: one image query changing rank moves RSUM by 8.3
    assert abs(json.loads(metrics.read_text())["rsum"] - recorded["rsum"]) <= 10.0, (recorded, metrics.read_text())


def test_killed_run_on_cuda_resumes_to_the_same_weights(flickr8k_root, tmp_path, use_cache, monkeypatch):
    """Resume on the GPU: the CPU RNG (augmentations drawn on the host) and the GPU's own are
    restored. Looser than the CPU test: GPU scatters (GPO's backward) add in varying order."""
    from test_train import _Interrupt, slice_config

    from vseinf.losses import VSELoss
    from vseinf.train import train

    cfg = dict(epochs=2, max_steps_per_epoch=6, save_every=4, lr_decay_epoch=1, max_train_images=60,
               max_val_images=12, image_size=96, embed_dim=64, batch_size=8, precision="fp32")
    full = tmp_path / "full"
    train(slice_config(flickr8k_root, **cfg), full, progress=False)
    original = VSELoss.forward
    calls = {"n": 0}

    def dying_forward(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # epoch 2, after the step-8 save
            raise _Interrupt()
        return original(self, *a, **k)

    monkeypatch.setattr(VSELoss, "forward", dying_forward)
    killed = tmp_path / "killed"
    with pytest.raises(_Interrupt):
        train(slice_config(flickr8k_root, **cfg), killed, progress=False)
    monkeypatch.setattr(VSELoss, "forward", original)
    train(slice_config(flickr8k_root, **cfg), killed, resume=True, progress=False)
    from safetensors.torch import load_file

    a = load_file(str(full / "last" / "model.safetensors"))
    b = load_file(str(killed / "last" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_nccl_processes_train_like_one(flickr8k_root, tmp_path, use_cache):
    from test_distributed import check_two_processes_train_like_one

    # cuDNN and the GPU's reduction orders differ between batch 16 and 2 × 8: looser than gloo's 1e-5
    check_two_processes_train_like_one(flickr8k_root, tmp_path, dict(os.environ, CUDA_VISIBLE_DEVICES="0,1"),
                                       rtol=1e-3, atol=1e-4, port=29533)


@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="needs exactly one GPU")
def test_more_processes_than_gpus_is_a_clear_error(tmp_path):
    from test_distributed import TORCHRUN

    proc = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", "--master_port", "29535", "-m", "vseinf", "train",
                           "--data", str(tmp_path), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "more processes on this machine than it has GPUs (1)" in proc.stdout + proc.stderr


def test_gallery_encoded_and_searched_on_cuda_matches_the_cpu(flickr8k_root, tmp_path, capsys):
    """`vseinf encode/search --device cuda`: the bundled model on the GPU embeds a photo folder like
    the CPU does, and the GPU exact engine returns the CPU's ranking."""
    from vseinf.cli import main
    from vseinf.search.gallery import Gallery

    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted((flickr8k_root / "Flicker8k_Dataset").glob("*.jpg"))[:12]:
        shutil.copyfile(src, photos / src.name)
    indexes = {}
    for device in ("cuda", "cpu"):
        indexes[device] = tmp_path / f"index-{device}"
        assert main(["encode", str(photos), "--out", str(indexes[device]), "--device", device, "--no-progress",
                     "--engine", "exact"]) == 0
    capsys.readouterr()
    emb_gpu, emb_cpu = (np.load(indexes[d] / "embeddings.npy") for d in ("cuda", "cpu"))
    np.testing.assert_allclose(emb_gpu, emb_cpu, atol=2e-4, rtol=0)
    query = "a dog runs through the grass"
    answers = {}
    for device in ("cuda", "cpu"):
        assert main(["search", str(indexes["cpu"]), query, "-k", "5", "--json", "--device", device]) == 0
        answers[device] = json.loads(capsys.readouterr().out)["results"]
    assert [r["path"] for r in answers["cuda"]] == [r["path"] for r in answers["cpu"]]
    np.testing.assert_allclose([r["score"] for r in answers["cuda"]], [r["score"] for r in answers["cpu"]],
                               atol=2e-4)
    assert Gallery.load(indexes["cpu"], device="cuda").engine._rows.device.type == "cuda"
