"""Branched pooling ("gpo+max"): one model that scores as an ensemble of a GPO and a max model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vseinf.config import ModelConfig
from vseinf.encoders.text import Vocabulary
from vseinf.losses import VSELoss, hinge_triplet_loss_reference, info_nce_loss_reference
from vseinf.model import build_model
from vseinf.pooling import BranchPool, build_pooling, pooling_coefficients

VOCAB = [*Vocabulary.SPECIALS, "a", "dog"]


def test_each_slice_is_its_own_poolings_unit_vector_and_the_dot_product_is_the_mean_cosine():
    torch.manual_seed(0)
    pool = build_pooling("gpo+max", 16)
    assert isinstance(pool, BranchPool)
    x, lengths = torch.randn(5, 7, 16), torch.tensor([7, 3, 1, 5, 2])
    y, y_lengths = torch.randn(4, 6, 16), torch.tensor([6, 6, 2, 4])
    out, _ = pool(x, lengths)
    gpo_part = F.normalize(pool.branches[0](x[..., :8], lengths)[0], dim=-1)
    max_part = F.normalize(torch.stack([x[i, :n, 8:].amax(0) for i, n in enumerate(lengths)]), dim=-1)
    torch.testing.assert_close(out, torch.cat([gpo_part, max_part], 1) / math.sqrt(2))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    out_y, _ = pool(y, y_lengths)
    gpo_y = F.normalize(pool.branches[0](y[..., :8], y_lengths)[0], dim=-1)
    max_y = F.normalize(torch.stack([y[i, :n, 8:].amax(0) for i, n in enumerate(y_lengths)]), dim=-1)
    # What an ensemble of a GPO model and a max model scores: the average of the two similarities.
    torch.testing.assert_close(out @ out_y.T, (gpo_part @ gpo_y.T + max_part @ max_y.T) / 2)


def test_badly_written_branches_are_refused_with_the_name():
    with pytest.raises(ValueError, match="multiple of 2"):
        build_pooling("gpo+max", 15)
    with pytest.raises(ValueError, match="NAME\\+NAME"):
        build_pooling("gpo+", 16)
    with pytest.raises(ValueError, match="unknown pooling 'nope'"):
        build_pooling("gpo+nope", 16)


@pytest.mark.parametrize("kind", ["hinge", "infonce"])
@pytest.mark.parametrize("warmup", [False, True])
def test_the_branched_loss_is_the_sum_of_each_branchs_loss(kind, warmup):
    torch.manual_seed(1)
    n, k, d = 10, 3, 8
    parts_i = [F.normalize(torch.randn(n, d), dim=1).requires_grad_() for _ in range(k)]
    parts_t = [F.normalize(torch.randn(n, d), dim=1).requires_grad_() for _ in range(k)]
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7])
    scale = torch.tensor(math.log(10.0))
    img = torch.cat(parts_i, 1) / math.sqrt(k)
    txt = torch.cat(parts_t, 1) / math.sqrt(k)
    got = VSELoss(kind, 0.2, branches=k)(img, txt, ids, warmup=warmup, logit_scale=scale)
    if kind == "hinge":
        want = sum(hinge_triplet_loss_reference(i, t, ids, 0.2, hardest=not warmup)
                   for i, t in zip(parts_i, parts_t))
    else:
        want = sum(info_nce_loss_reference(i, t, ids, scale) for i, t in zip(parts_i, parts_t))
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got, parts_i + parts_t)
    want_grads = torch.autograd.grad(want, parts_i + parts_t)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_a_branched_model_embeds_unit_vectors_and_plots_its_gpo_branch():
    cfg = ModelConfig(image_encoder="region", feature_dim=12, text_encoder="bigru", word_dim=8, embed_dim=16,
                      image_pooling="gpo+max", text_pooling="gpo+avg")
    model = build_model(cfg, vocab=VOCAB, pretrained=False).eval()
    assert model.branches == 2
    emb = model.embed_images(torch.randn(3, 5, 12), torch.tensor([5, 2, 4]))
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert pooling_coefficients(model.image_head.gpool, [3, 5]).shape == (2, 5)


def test_image_and_text_must_have_as_many_branches():
    cfg = ModelConfig(image_encoder="region", feature_dim=12, text_encoder="bigru", word_dim=8, embed_dim=16,
                      image_pooling="gpo+max", text_pooling="gpo")
    with pytest.raises(ValueError, match="as many '\\+' branches"):
        build_model(cfg, vocab=VOCAB, pretrained=False)


def test_the_web_app_shows_the_gpo_branch_of_a_branched_model():
    pytest.importorskip("fastapi")
    from vseinf.serve.app import gpo_coefficients

    cfg = ModelConfig(image_encoder="region", feature_dim=12, text_encoder="bigru", word_dim=8, embed_dim=16,
                      image_pooling="gpo+max", text_pooling="gpo+max")
    model = build_model(cfg, vocab=VOCAB, pretrained=False).eval()
    shown = gpo_coefficients(model)
    assert shown["image"]["pooling"] == shown["text"]["pooling"] == "GPO of gpo+max"
    for entry in shown.values():
        assert entry["sizes"] and all(abs(sum(t) - 1) < 1e-4 for t in entry["theta"])
