"""The pooling study's aggregators: FSPool, first-token, self-attention, and GPO's variants.

Each is held to the set properties of the baselines (padding never matters, permutation
invariance where it is claimed, one set alone pools like in a batch) and to a slow, obviously-right
twin written here from its definition. GPO with default arguments must stay the paper's GPO.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from vseinf.pooling import (
    GPO,
    POOLING_NAMES,
    ClsPool,
    FeatureGPO,
    FSPool,
    PerDimensionGPO,
    SelfAttentionPool,
    TransformerGPO,
    build_pooling,
    positional_encoding,
)

VARIANTS = ["fspool", "cls", "attention", "gpo-perdim", "gpo-features", "gpo-transformer"]
INVARIANT = [n for n in VARIANTS if n != "cls"]
DIM = 4
FILLS = [1e30, -1e30, math.inf, -math.inf, math.nan]
FEW = settings(max_examples=15, deadline=None)


def make_pool(name: str, seed: int = 0) -> nn.Module:
    """A pool with non-trivial parameters (FSPool's curves start flat, so they are randomised)."""
    torch.manual_seed(seed)
    pool = build_pooling(name, DIM)
    if isinstance(pool, FSPool):
        with torch.no_grad():
            pool.weight.normal_(1.0, 0.5)
    return pool


@st.composite
def set_batches(draw, max_n: int = 9):
    n_max = draw(st.integers(1, max_n))
    batch = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, n_max), min_size=batch, max_size=batch))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(batch, n_max, DIM, generator=gen), torch.tensor(lengths)


def pad_with(features, lengths, value):
    out = features.clone()
    for b, n in enumerate(lengths.tolist()):
        out[b, n:] = value
    return out


def padding(lengths, n_max):
    return torch.arange(n_max).unsqueeze(0) >= lengths.unsqueeze(1)


def close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Set properties


@pytest.mark.parametrize("name", VARIANTS)
@FEW
@given(batch=set_batches(), fill=st.sampled_from(FILLS))
def test_padding_values_never_matter_for_outputs_or_gradients(name, batch, fill):
    features, lengths = batch
    pool = make_pool(name)
    probe = torch.randn(features.shape[0], DIM, generator=torch.Generator().manual_seed(1))
    clean = features.clone().requires_grad_(True)
    out, weights = pool(clean, lengths)
    (out * probe).sum().backward()
    clean_grads = [p.grad.clone() for p in pool.parameters() if p.grad is not None]
    pool.zero_grad(set_to_none=True)

    dirty = pad_with(features, lengths, fill).requires_grad_(True)
    out_dirty, weights_dirty = pool(dirty, lengths)
    (out_dirty * probe).sum().backward()
    close(out_dirty, out)
    close(weights_dirty, weights)
    assert (weights_dirty[padding(lengths, features.shape[1])] == 0).all()
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[padding(lengths, features.shape[1])] == 0).all()
    close(dirty.grad, clean.grad)
    dirty_grads = [p.grad for p in pool.parameters() if p.grad is not None]
    assert len(dirty_grads) == len(clean_grads) > (0 if name != "cls" else -1)
    for g_dirty, g_clean in zip(dirty_grads, clean_grads):
        assert torch.isfinite(g_dirty).all()
        close(g_dirty, g_clean)


@pytest.mark.parametrize("name", INVARIANT)
@FEW
@given(batch=set_batches(), perm_seed=st.integers(0, 2**31 - 1))
def test_permuting_the_valid_elements_changes_nothing(name, batch, perm_seed):
    features, lengths = batch
    pool = make_pool(name)
    gen = torch.Generator().manual_seed(perm_seed)
    shuffled = features.clone()
    for b, n in enumerate(lengths.tolist()):
        shuffled[b, :n] = features[b, torch.randperm(n, generator=gen)]
    out, _ = pool(features, lengths)
    out_shuffled, _ = pool(shuffled, lengths)
    close(out_shuffled, out)


def test_cls_pooling_is_the_first_element_and_depends_on_order():
    features = torch.randn(3, 5, DIM)
    out, weights = ClsPool()(pad_with(features, torch.tensor([5, 2, 1]), math.nan), torch.tensor([5, 2, 1]))
    close(out, features[:, 0])
    assert weights[:, 0].eq(1).all() and weights[:, 1:].eq(0).all()
    swapped = features[:, [1, 0, 2, 3, 4]]
    assert not torch.allclose(ClsPool()(swapped, None)[0], out)


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=8, deadline=None)
@given(n_max=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_each_set_pools_as_it_would_alone(name, n_max, seed):
    """One sample of each length 1..N in one batch (with extra padding columns) equals each set
    pooled on its own; a one-element set pools to that element wherever θ sums to 1."""
    pool = make_pool(name)
    features = torch.randn(n_max, n_max + 2, DIM, generator=torch.Generator().manual_seed(seed))
    lengths = torch.arange(1, n_max + 1)
    out, weights = pool(features, lengths)
    for b in range(n_max):
        n = b + 1
        alone, alone_weights = pool(features[b:b + 1, :n], torch.tensor([n]))
        close(out[b:b + 1], alone)
        close(weights[b:b + 1, :n], alone_weights)
    if name != "fspool":  # FSPool's coefficients are not normalised
        close(out[0], features[0, 0])
        close(weights.sum(1), torch.ones(n_max))


# ---------------------------------------------------------------------------------------------
# Slow twins


def test_fspool_equals_its_definition_and_starts_as_average_pooling():
    torch.manual_seed(0)
    pool = FSPool(3, n_pieces=5)
    x = torch.randn(4, 8, 3)
    lengths = torch.tensor([8, 5, 2, 1])
    close(pool(x, lengths)[0], torch.stack([x[b, :n].mean(0) for b, n in enumerate(lengths.tolist())]))
    with torch.no_grad():
        pool.weight.normal_()
    out, _ = pool(x, lengths)
    knots = np.linspace(0, 1, 6)
    for b, n in enumerate(lengths.tolist()):
        values = np.sort(x[b, :n].numpy(), axis=0)[::-1]
        where = np.arange(n) / max(n - 1, 1)
        for d in range(3):
            coef = np.interp(where, knots, pool.weight[d].detach().numpy()) / n
            assert out[b, d].item() == pytest.approx(float((coef * values[:, d]).sum()), abs=1e-5)


def test_self_attention_pool_is_the_mean_of_one_attention_layer_with_residual():
    torch.manual_seed(0)
    pool = SelfAttentionPool(8, n_heads=2, d_key=3)
    x = torch.randn(3, 6, 8)
    lengths = torch.tensor([6, 3, 1])
    out, weights = pool(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        xs = x[b, :n]
        q = pool.query(xs).view(n, 2, 3)
        k = pool.key(xs).view(n, 2, 3)
        y = xs.clone()
        for h in range(2):
            a = torch.softmax(q[:, h] @ k[:, h].T / math.sqrt(3), dim=1)  # n × n
            y[:, h * 4:(h + 1) * 4] += a @ xs[:, h * 4:(h + 1) * 4]
        close(out[b], y.mean(0) / 2)
    assert (weights >= 0).all()


def test_default_gpo_is_the_paper_module_with_the_same_initial_weights():
    torch.manual_seed(3)
    gpo = GPO()
    torch.manual_seed(3)
    gru = nn.GRU(32, 32, num_layers=1, batch_first=True, bidirectional=True)
    linear = nn.Linear(32, 1, bias=False)
    expected = {**{f"gru.{k}": v for k, v in gru.state_dict().items()}, "linear.weight": linear.weight}
    assert set(gpo.state_dict()) == set(expected)
    for k, v in gpo.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert type(gpo) is GPO and gpo.temperature == 0.1


def _theta_alone(pool: GPO, n: int) -> torch.Tensor:
    """θ (n × P) of a size-only GPO variant, its generator run on n positions without padding."""
    pe = positional_encoding(n, pool.d_pe).unsqueeze(0)
    if not isinstance(pool, TransformerGPO):
        out, _ = pool.gru(pe)
        hidden = (out[..., :pool.d_hidden] + out[..., pool.d_hidden:]) / 2
    else:
        hidden = pool.transformer(pool.transformer_in(pe))
    return torch.softmax(pool.linear(hidden)[0] / pool.temperature, dim=0)


def test_per_dimension_gpo_applies_each_dimension_its_own_theta():
    torch.manual_seed(0)
    pool = PerDimensionGPO(3)
    x = torch.randn(3, 7, 3)
    lengths = torch.tensor([7, 4, 1])
    out, weights = pool(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        theta = _theta_alone(pool, n)  # n × 3
        values = x[b, :n].sort(dim=0, descending=True).values
        close(out[b], (theta * values).sum(0))
        close(weights[b, :n], theta.mean(1))
    assert pool.coefficients(torch.tensor([7, 4])).shape == (2, 7, 3)


def test_per_dimension_gpo_with_equal_rows_equals_the_shared_gpo():
    torch.manual_seed(0)
    shared = GPO()
    per_dim = PerDimensionGPO(5)
    per_dim.gru.load_state_dict(shared.gru.state_dict())
    with torch.no_grad():
        per_dim.linear.weight.copy_(shared.linear.weight.expand(5, -1))
    x, lengths = torch.randn(4, 9, 5), torch.tensor([9, 6, 2, 1])
    close(per_dim(x, lengths)[0], shared(x, lengths)[0])


def test_transformer_gpo_equals_its_generator_run_on_each_size_alone_in_train_and_eval_mode():
    torch.manual_seed(0)
    pool = TransformerGPO()
    x = torch.randn(4, 9, 6)
    lengths = torch.tensor([9, 5, 2, 1])
    trained, _ = pool(x, lengths)
    pool.eval()
    with torch.no_grad():  # nn.TransformerEncoderLayer takes a different kernel path here
        evaluated, weights = pool(x, lengths)
    close(evaluated, trained)
    for b, n in enumerate(lengths.tolist()):
        close(weights[b, :n], _theta_alone(pool, n)[:, 0])
    assert "gru.weight_ih_l0" not in pool.state_dict()


def test_feature_gpo_computes_theta_from_each_samples_own_sorted_values():
    torch.manual_seed(0)
    pool = FeatureGPO(3)
    x = torch.randn(3, 6, 3)
    lengths = torch.tensor([6, 4, 1])
    out, weights = pool(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        values = x[b, :n].sort(dim=0, descending=True).values
        inputs = torch.cat([positional_encoding(n, 32), pool.feature_proj(values)], dim=1).unsqueeze(0)
        h, _ = pool.gru(inputs)
        theta = torch.softmax(pool.linear((h[..., :32] + h[..., 32:]) / 2)[0, :, 0] / 0.1, dim=0)
        close(weights[b, :n], theta)
        close(out[b], (theta.unsqueeze(1) * values).sum(0))
    # Same size, different values: different θ (the point of the variant).
    y = x.clone()
    y[0, :, 0] *= 5
    assert not torch.allclose(pool(y, lengths)[1][0], weights[0])
    with pytest.raises(ValueError, match="depend on the feature values"):
        pool.coefficients(torch.tensor([4]))


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_run_under_bf16_autocast_with_finite_gradients(name):
    """The study trains with --precision bf16: every variant must run and train under autocast."""
    pool = build_pooling(name, 16)
    x = torch.randn(6, 11, 16, requires_grad=True)
    lengths = torch.tensor([11, 7, 3, 1, 11, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = pool(x.to(torch.bfloat16), lengths)
    out.float().pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for p in pool.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


# ---------------------------------------------------------------------------------------------
# Registry and errors


def test_build_pooling_builds_every_study_name():
    kinds = {"fspool": FSPool, "cls": ClsPool, "attention": SelfAttentionPool, "gpo-perdim": PerDimensionGPO,
             "gpo-features": FeatureGPO, " GPO-Transformer ": TransformerGPO}
    for name, cls in kinds.items():
        assert isinstance(build_pooling(name, 16), cls)
        assert name.strip().lower() in POOLING_NAMES
    assert build_pooling("gpo-perdim", 16).per_dimension == 16
    assert build_pooling("gpo-features", 16).feature_dim == 16


@pytest.mark.parametrize("name", ["fspool", "attention", "gpo-perdim", "gpo-features"])
def test_pools_that_need_the_dimension_say_so(name):
    with pytest.raises(ValueError, match="dimension"):
        build_pooling(name)
    with pytest.raises(ValueError, match="dimension"):
        build_pooling(name, 8)(torch.randn(2, 3, 5), torch.tensor([3, 2]))


def test_bad_gpo_options_are_rejected():
    with pytest.raises(ValueError, match="per_dimension"):
        PerDimensionGPO(0)
    with pytest.raises(ValueError, match="feature_dim"):
        FeatureGPO(-1)
    for cls in (GPO, TransformerGPO):
        with pytest.raises(ValueError, match="temperature"):
            cls(temperature=0)
