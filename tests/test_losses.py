"""Losses: the vectorised hinge and InfoNCE against their loop twins, same-image masking, the
module wrapper, and two real gloo processes against one process on the concatenated batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vseinf.losses import (
    VSELoss,
    gather_batch,
    gather_with_grad,
    hinge_triplet_loss,
    hinge_triplet_loss_reference,
    info_nce_loss,
    info_nce_loss_reference,
)

# Rows 3, 4 and 5 show one image and straddle the two ranks of the distributed test.
IMAGE_IDS = [0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 7]
SPLIT = (5, 7)  # uneven local batches: rank 0 has rows 0..4, rank 1 rows 5..11
LOGIT_SCALE = 2.0


def make_batch(n: int = 12, dim: int = 16, seed: int = 7, noise: float = 0.8):
    """Float64 l2-normalised pairs; captions are noisy copies of their image, so hinge terms are
    active but not all of them."""
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    txt = F.normalize(img + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    return img, txt


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def loss_and_grads(fn, img, txt, *extra):
    img, txt = leaves(img, txt)
    extra = leaves(*extra)
    loss = fn(img, txt, *extra)
    grads = torch.autograd.grad(loss, [img, txt, *extra])
    return loss.detach(), grads


# ---------------------------------------------------------------------------------------------
# Hinge triplet loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("ids", [None, IMAGE_IDS])
def test_hinge_matches_loop_reference_in_value_and_gradient(hardest, ids):
    img, txt = make_batch()
    fast, g_fast = loss_and_grads(
        lambda i, t: hinge_triplet_loss(i, t, ids, 0.2, hardest), img, txt
    )
    slow, g_slow = loss_and_grads(
        lambda i, t: hinge_triplet_loss_reference(i, t, ids, 0.2, hardest), img, txt
    )
    assert fast.item() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_hinge_by_hand():
    e = torch.eye(2)
    # Perfectly aligned pairs, negatives orthogonal: 0.2 - 1 + 0 < 0, no loss.
    assert hinge_triplet_loss(e, e).item() == 0.0
    # Swapped captions: positive 0, negative 1: each of 2 anchors × 2 directions costs 1.2.
    assert hinge_triplet_loss(e, e.flip(0)).item() == pytest.approx(4.8)
    assert hinge_triplet_loss(e, e.flip(0), margin=0.5).item() == pytest.approx(6.0)


def test_hardest_takes_the_max_and_warmup_sums_all_negatives():
    img = torch.eye(3)
    txt = F.normalize(torch.tensor([[1.0, 0.9, 0.6], [0.7, 1.0, 0.0], [0.0, 0.8, 1.0]]), dim=1)
    s = (img @ txt.T).tolist()
    m = 0.5
    cost = lambda x: max(0.0, x)  # noqa: E731
    i2t = [[cost(m - s[a][a] + s[a][j]) for j in range(3) if j != a] for a in range(3)]
    t2i = [[cost(m - s[a][a] + s[j][a]) for j in range(3) if j != a] for a in range(3)]
    hardest = sum(max(r) for r in i2t) + sum(max(r) for r in t2i)
    summed = sum(map(sum, i2t)) + sum(map(sum, t2i))
    assert summed > hardest > 0
    assert hinge_triplet_loss(img, txt, margin=m).item() == pytest.approx(hardest)
    assert hinge_triplet_loss(img, txt, margin=m, hardest=False).item() == pytest.approx(summed)
    loss = VSELoss("hinge", margin=m)
    assert loss(img, txt).item() == pytest.approx(hardest)
    assert loss(img, txt, warmup=True).item() == pytest.approx(summed)


def test_same_image_captions_are_not_negatives():
    # Rows 0 and 1 show the same image with two captions; caption 1 scores higher with image 0
    # than caption 0 does. The authors' code would call caption 1 image 0's hardest negative.
    img = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    txt = F.normalize(torch.tensor([[1.0, 0.3, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    ids = torch.tensor([10, 10, 11])
    assert hinge_triplet_loss(img, txt, ids).item() == 0.0
    assert hinge_triplet_loss(img, txt, ids, hardest=False).item() == 0.0
    unmasked = hinge_triplet_loss(img, txt)  # ids default: every row a different image
    assert unmasked.item() > 0.5
    # Every row the same image: nothing is a negative, the loss is zero.
    assert hinge_triplet_loss(img, txt, [3, 3, 3]).item() == 0.0


@pytest.mark.parametrize("hardest", [True, False])
def test_local_rows_partition_the_hinge_loss(hardest):
    img, txt = make_batch()
    full, g_full = loss_and_grads(
        lambda i, t: hinge_triplet_loss(i, t, IMAGE_IDS, hardest=hardest), img, txt
    )
    parts = [slice(0, 5), slice(5, 9), slice(9, None)]
    total, g_total = loss_and_grads(
        lambda i, t: sum(
            hinge_triplet_loss(i, t, IMAGE_IDS, hardest=hardest, local_rows=r) for r in parts
        ),
        img, txt,
    )  # fmt: skip
    torch.testing.assert_close(total, full)
    for a, b in zip(g_total, g_full):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# InfoNCE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [None, IMAGE_IDS])
def test_info_nce_matches_loop_reference_including_temperature_gradient(ids):
    img, txt = make_batch()
    scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64)
    fast, g_fast = loss_and_grads(lambda i, t, s: info_nce_loss(i, t, ids, s), img, txt, scale)
    slow, g_slow = loss_and_grads(
        lambda i, t, s: info_nce_loss_reference(i, t, ids, s), img, txt, scale
    )
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_fast[2].abs().item() > 0  # the temperature really learns


def test_info_nce_without_duplicates_is_clips_symmetric_cross_entropy():
    img, txt = make_batch()
    logits = math.exp(LOGIT_SCALE) * img @ txt.T
    target = torch.arange(len(img))
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(info_nce_loss(img, txt, None, LOGIT_SCALE), clip)


def test_info_nce_masks_same_image_rows_and_clamps_the_scale():
    img, txt = make_batch()
    # All rows one image: each softmax holds only the positive, so the loss is exactly zero.
    assert info_nce_loss(img, txt, [1] * len(img)).item() == pytest.approx(0.0, abs=1e-12)
    masked = info_nce_loss(img, txt, IMAGE_IDS)
    assert masked.item() < info_nce_loss(img, txt, None).item()  # fewer terms in the softmax
    # exp(logit_scale) is clamped at 100: above it, the loss is flat in the scale.
    big = torch.tensor(math.log(1000.0), dtype=torch.float64, requires_grad=True)
    at_clamp = info_nce_loss(img, txt, IMAGE_IDS, math.log(100.0))
    loss = info_nce_loss(img, txt, IMAGE_IDS, big)
    torch.testing.assert_close(loss.detach(), at_clamp)
    (grad,) = torch.autograd.grad(loss, big)
    assert grad.item() == 0.0


def test_local_rows_partition_info_nce():
    img, txt = make_batch()
    scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64)
    full, g_full = loss_and_grads(
        lambda i, t, s: info_nce_loss(i, t, IMAGE_IDS, s), img, txt, scale
    )
    total, g_total = loss_and_grads(
        lambda i, t, s: sum(
            info_nce_loss(i, t, IMAGE_IDS, s, local_rows=r) for r in (slice(0, 7), slice(7, 12))
        ),
        img, txt, scale,
    )  # fmt: skip
    torch.testing.assert_close(total, full)
    for a, b in zip(g_total, g_full):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# The module and input errors
# ---------------------------------------------------------------------------------------------


def test_vse_loss_module_takes_the_models_temperature():
    """The loss holds no parameters: InfoNCE's temperature is the model's, passed in, and gets
    its gradient there; the hinge loss ignores it."""
    assert list(VSELoss("hinge").parameters()) == list(VSELoss("infonce").parameters()) == []
    img, txt = make_batch()
    img, txt = img.float(), txt.float()
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    infonce = VSELoss("infonce")
    loss = infonce(img, txt, IMAGE_IDS, logit_scale=scale)
    torch.testing.assert_close(loss, info_nce_loss(img, txt, IMAGE_IDS, scale))
    loss.backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0
    # warm-up has no meaning for InfoNCE; it always uses every negative
    assert infonce(img, txt, IMAGE_IDS, warmup=True, logit_scale=scale).item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match="logit_scale"):
        infonce(img, txt, IMAGE_IDS)
    assert VSELoss("hinge")(img, txt, IMAGE_IDS, logit_scale=scale).item() == pytest.approx(
        hinge_triplet_loss(img, txt, IMAGE_IDS).item())


def test_bad_inputs_name_the_field():
    img, txt = make_batch()
    with pytest.raises(ValueError, match="kind"):
        VSELoss("triplet")
    with pytest.raises(ValueError, match="margin"):
        VSELoss("hinge", margin=-0.1)
    with pytest.raises(ValueError, match="txt.*positive pair"):
        hinge_triplet_loss(img, txt[:5])
    with pytest.raises(ValueError, match="img.*2-D"):
        info_nce_loss(img[0], txt[0])
    with pytest.raises(ValueError, match="image_ids.*12"):
        hinge_triplet_loss(img, txt, [0, 1, 2])
    with pytest.raises(ValueError, match="local_rows.*step"):
        hinge_triplet_loss(img, txt, local_rows=slice(0, 12, 2))
    with pytest.raises(ValueError, match="local_rows"):
        info_nce_loss(img, txt, local_rows=[0, 1])


def test_gathering_without_a_process_group_is_the_identity():
    assert not dist.is_initialized()
    img, txt = make_batch()
    assert gather_with_grad(img) is img
    g_img, g_txt, ids, rows = gather_batch(img, txt, IMAGE_IDS)
    assert g_img is img and g_txt is txt and rows == slice(0, 12)
    assert ids.tolist() == IMAGE_IDS


# ---------------------------------------------------------------------------------------------
# Two gloo processes against one process on the concatenated batch
# ---------------------------------------------------------------------------------------------

KINDS = ("hinge", "warmup", "infonce")


def _loss(kind, img, txt, ids, scale, local_rows=None):
    if kind == "infonce":
        return info_nce_loss(img, txt, ids, scale, local_rows=local_rows)
    return hinge_triplet_loss(img, txt, ids, hardest=kind == "hinge", local_rows=local_rows)


def _rank_worker(rank: int, init_file: str, out_dir: str, backend: str = "gloo", split=SPLIT) -> None:
    """One rank: its rows as leaves, the global batch gathered, its local loss backpropagated.
    With ``backend="nccl"`` rank r computes on cuda:r (tests/test_cuda.py)."""
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=len(split))
    try:
        img, txt = (t.to(device) for t in make_batch())
        start = sum(split[:rank])
        mine = slice(start, start + split[rank])
        # gather_with_grad alone reassembles the global batch in rank order
        torch.testing.assert_close(gather_with_grad(img[mine]), img, rtol=0, atol=0)
        out = {}
        for kind in KINDS:
            local_img, local_txt = leaves(img[mine], txt[mine])
            scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64, device=device, requires_grad=True)
            all_img, all_txt, all_ids, rows = gather_batch(
                local_img, local_txt, torch.tensor(IMAGE_IDS, device=device)[mine]
            )
            assert rows == mine and all_ids.tolist() == IMAGE_IDS
            loss = _loss(kind, all_img, all_txt, all_ids, scale, local_rows=rows)
            loss.backward()
            out[f"{kind}_loss"] = loss.detach().cpu().numpy()
            out[f"{kind}_img"] = local_img.grad.cpu().numpy()
            out[f"{kind}_txt"] = local_txt.grad.cpu().numpy()
            no_grad = torch.zeros((), dtype=torch.float64)  # hinge: the scale is unused
            out[f"{kind}_scale"] = (no_grad if scale.grad is None else scale.grad).cpu().numpy()
        np.savez(f"{out_dir}/rank{rank}.npz", **out)
    finally:
        dist.destroy_process_group()


def check_ranks_equal_one_process(tmp_path, backend: str = "gloo", split=SPLIT) -> None:
    """Spawn ``len(split)`` ranks and compare their losses and gradients with one process's."""
    mp.spawn(
        _rank_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), backend, split), nprocs=len(split),
        join=True,
    )  # fmt: skip
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(len(split))]
    img, txt = make_batch()
    for kind in KINDS:
        full_img, full_txt = leaves(img, txt)
        scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64, requires_grad=True)
        loss = _loss(kind, full_img, full_txt, torch.tensor(IMAGE_IDS), scale)
        loss.backward()
        assert loss.item() > 0
        assert sum(float(r[f"{kind}_loss"]) for r in ranks) == pytest.approx(loss.item(), abs=1e-5)
        # each rank's gradient on its own rows is the full gradient on those rows
        got_img = np.concatenate([r[f"{kind}_img"] for r in ranks])
        got_txt = np.concatenate([r[f"{kind}_txt"] for r in ranks])
        np.testing.assert_allclose(got_img, full_img.grad.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(got_txt, full_txt.grad.numpy(), atol=1e-5, rtol=0)
        # the shared temperature's gradient adds up over ranks (what an all-reduce sum gives)
        got_scale = sum(float(r[f"{kind}_scale"]) for r in ranks)
        want_scale = scale.grad.item() if scale.grad is not None else 0.0
        assert got_scale == pytest.approx(want_scale, abs=1e-5)


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    check_ranks_equal_one_process(tmp_path, "gloo")
