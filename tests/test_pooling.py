"""Pooling layers: the properties a user of ``vseinf.pooling`` relies on.

Every pool is a function of a *set*: the order of the valid elements and whatever sits in the
padding must not matter, for outputs, coefficients or gradients. GPO's fast path is held equal to
its slow twin (``GPOReference``) and to an independent re-implementation of the authors' published
algorithm, loaded from a state dict with their key names. The special cases GPO generalises (max,
average, K-max) are checked against the fixed pools, and the input checks must say what is wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from vseinf.pooling import (
    GPO,
    AvgPool,
    GeMPool,
    GPOReference,
    KMaxPool,
    MaxPool,
    build_pooling,
    rank_weighted_sum,
    rank_weighted_sum_reference,
    size_augment,
)

POOLS = ["gpo", "avg", "max", "kmax:3", "gem", "interp", "sincos_mlp", "index_bigru"]
PADDING_FILLS = [1e30, -1e30, math.inf, -math.inf, math.nan]
FEW = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny ops: on a shared 2-core machine one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_pool(name: str, seed: int = 0) -> nn.Module:
    """A pool with non-trivial parameters: fresh generators give spread θ; the interpolated
    generator starts uniform (= average pooling), so its knots are randomised; GeM gets p ≠ 1."""
    torch.manual_seed(seed)
    pool = build_pooling(name, 4)
    with torch.no_grad():
        if name == "interp":
            pool.knots.normal_(0.0, 0.3)
        if name == "gem":
            pool.p.fill_(3.5)
    return pool


@st.composite
def set_batches(draw, max_n: int = 10):
    """(features B×N×D float32, lengths LongTensor[B]) with every length in 1..N."""
    n_max = draw(st.integers(1, max_n))
    batch = draw(st.integers(1, 4))
    dim = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, n_max), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n_max, dim, generator=gen)
    return features, torch.tensor(lengths, dtype=torch.long)


def pad_with(features: torch.Tensor, lengths: torch.Tensor, value: float) -> torch.Tensor:
    out = features.clone()
    for b, n in enumerate(lengths.tolist()):
        out[b, n:] = value
    return out


def padding_mask(lengths: torch.Tensor, n_max: int) -> torch.Tensor:
    return torch.arange(n_max).unsqueeze(0) >= lengths.unsqueeze(1)


def close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Set properties, for every pool


@pytest.mark.parametrize("name", POOLS)
@FEW
@given(batch=set_batches(), perm_seed=st.integers(0, 2**31 - 1))
def test_permuting_the_valid_elements_changes_nothing(name, batch, perm_seed):
    features, lengths = batch
    pool = make_pool(name)
    gen = torch.Generator().manual_seed(perm_seed)
    shuffled = features.clone()
    for b, n in enumerate(lengths.tolist()):
        shuffled[b, :n] = features[b, torch.randperm(n, generator=gen)]
    out, weights = pool(features, lengths)
    out_shuffled, weights_shuffled = pool(shuffled, lengths)
    close(out_shuffled, out)
    close(weights_shuffled, weights)


@pytest.mark.parametrize("name", POOLS)
@FEW
@given(batch=set_batches(), fill=st.sampled_from(PADDING_FILLS))
def test_padding_values_never_matter_for_outputs_weights_or_gradients(name, batch, fill):
    features, lengths = batch
    pool = make_pool(name)
    clean = features.clone().requires_grad_(True)
    dirty = pad_with(features, lengths, fill).requires_grad_(True)
    probe = torch.randn(features.shape[0], features.shape[2], generator=torch.Generator().manual_seed(1))

    out, weights = pool(clean, lengths)
    (out * probe).sum().backward()
    clean_param_grads = [p.grad.clone() for p in pool.parameters() if p.grad is not None]
    pool.zero_grad(set_to_none=True)

    out_dirty, weights_dirty = pool(dirty, lengths)
    (out_dirty * probe).sum().backward()

    close(out_dirty, out)
    valid = ~padding_mask(lengths, features.shape[1])
    close(weights_dirty[valid], weights[valid])
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[padding_mask(lengths, features.shape[1])] == 0).all()
    close(dirty.grad, clean.grad)
    if name == "gem" and (math.isnan(fill) or fill == math.inf):
        return  # known defect, see test_gem_exponent_gradient_ignores_nan_and_inf_padding
    dirty_param_grads = [p.grad for p in pool.parameters() if p.grad is not None]
    assert len(dirty_param_grads) == len(clean_param_grads)
    for g_dirty, g_clean in zip(dirty_param_grads, clean_param_grads):
        assert torch.isfinite(g_dirty).all()
        close(g_dirty, g_clean)


@pytest.mark.parametrize("name", POOLS)
@FEW
@given(batch=set_batches(), extra=st.integers(1, 5))
def test_extra_padding_columns_change_nothing(name, batch, extra):
    """A set's result must not depend on how long the batch's longest set happens to be."""
    features, lengths = batch
    pool = make_pool(name)
    wider = torch.cat([features, torch.full((features.shape[0], extra, features.shape[2]), 7.0)], dim=1)
    out, weights = pool(features, lengths)
    out_wide, weights_wide = pool(wider, lengths)
    close(out_wide, out)
    close(weights_wide[:, : features.shape[1]], weights)
    assert (weights_wide[:, features.shape[1]:] == 0).all()


@pytest.mark.parametrize("name", POOLS)
@settings(max_examples=12, deadline=None)
@given(n_max=st.integers(1, 12), dim=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_every_length_from_1_to_n_pools_like_the_set_alone(name, n_max, dim, seed):
    """One sample of each length 1..N in a batch; each equals the same set pooled on its own, and
    a one-element set pools to that element (positive values, where GeM is defined)."""
    pool = make_pool(name)
    features = torch.rand(n_max, n_max, dim, generator=torch.Generator().manual_seed(seed)) + 0.1
    lengths = torch.arange(1, n_max + 1)
    out, weights = pool(features, lengths)
    for b in range(n_max):
        n = b + 1
        alone, alone_weights = pool(features[b:b + 1, :n], torch.tensor([n]))
        close(out[b:b + 1], alone)
        close(weights[b:b + 1, :n], alone_weights)
    close(out[0], features[0, 0])


@pytest.mark.parametrize("name", POOLS)
@FEW
@given(batch=set_batches(max_n=14))
def test_weights_are_a_distribution_over_the_valid_positions(name, batch):
    features, lengths = batch
    pool = make_pool(name)
    _, weights = pool(features, lengths)
    assert weights.shape == features.shape[:2]
    assert (weights >= 0).all()
    assert (weights[padding_mask(lengths, features.shape[1])] == 0).all()
    close(weights.sum(1), torch.ones(features.shape[0]))


@pytest.mark.parametrize("name", POOLS)
def test_input_gradients_flow_to_valid_elements_only(name):
    """Sanity that gradients flow at all: a pool's input gradient sums to its weights' mass (1 per
    output dimension) for the rank-weighted pools, and is non-zero for every pool."""
    pool = make_pool(name)
    features = (torch.rand(3, 9, 5, generator=torch.Generator().manual_seed(3)) + 0.1).requires_grad_(True)
    lengths = torch.tensor([9, 4, 1])
    out, _ = pool(features, lengths)
    out.sum().backward()
    assert torch.isfinite(features.grad).all()
    assert (features.grad[padding_mask(lengths, 9)] == 0).all()
    per_sample = features.grad.sum(dim=(1, 2))
    assert (per_sample > 0).all()
    if name != "gem":  # GeM's gradient is not a convex combination
        close(per_sample, torch.full((3,), 5.0))


# ---------------------------------------------------------------------------------------------
# GPO: fast path against its slow twin


class SteepGPO(GPO):
    """GPO whose scores fall steeply with the position: θ is concentrated on the top 1–2 positions
    (the regime of a trained GPO on region features), so on a GPU the fast path stops sorting fully."""

    steepness = 1.0

    def size_scores(self, sizes, n_max):
        ramp = torch.arange(n_max, dtype=torch.float32) * self.steepness
        return super().size_scores(sizes, n_max) - ramp


class SteepGPOReference(GPOReference):
    """The same steep scores computed the slow way, per sample, without padding."""

    steepness = 1.0

    def theta(self, n):
        out, _ = self.gru(_pe_reference(n, self.d_pe).float().unsqueeze(0))
        half = out.shape[2] // 2
        scores = self.linear((out[..., :half] + out[..., half:]) / 2).squeeze(0).squeeze(1)
        return torch.softmax((scores - torch.arange(n, dtype=torch.float32) * self.steepness) / 0.1, dim=0)


def _pe_reference(n: int, d_pe: int) -> torch.Tensor:
    """Transformer positional encoding, 0-based positions, written out element by element."""
    pe = torch.zeros(n, d_pe, dtype=torch.float64)
    for pos in range(n):
        for i in range(0, d_pe, 2):
            angle = pos / (10000.0 ** (i / d_pe))
            pe[pos, i] = math.sin(angle)
            pe[pos, i + 1] = math.cos(angle)
    return pe


def _fast_and_reference(regime: str):
    torch.manual_seed(11)
    if regime == "concentrated":
        fast, ref = SteepGPO(), SteepGPOReference()
    else:
        fast, ref = GPO(), GPOReference()
    ref.load_state_dict(fast.state_dict(), strict=True)
    if regime == "repeated":
        lengths = torch.tensor([7, 7, 7, 40, 40, 3, 3, 3, 3, 40])
    else:
        lengths = torch.tensor([40, 1, 17, 33, 2, 25, 40])
    features = torch.randn(len(lengths), 40, 6, generator=torch.Generator().manual_seed(5))
    return fast, ref, features, lengths


@pytest.mark.parametrize("regime", ["fresh", "concentrated", "repeated"])
def test_gpo_fast_path_equals_reference_outputs_weights_and_gradients(regime):
    fast, ref, features, lengths = _fast_and_reference(regime)
    probe = torch.randn(features.shape[0], features.shape[2], generator=torch.Generator().manual_seed(2))
    results = []
    for pool in (fast, ref):
        x = features.clone().requires_grad_(True)
        out, weights = pool(x, lengths)
        ((out * probe).sum() + (weights ** 2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in pool.named_parameters()}
        results.append((out.detach(), weights.detach(), x.grad, grads))
    (out_f, w_f, gx_f, gp_f), (out_r, w_r, gx_r, gp_r) = results
    if regime == "concentrated":  # the regime really is concentrated: top-2 mass within 1e-6 of 1
        assert (w_f[:, :2].sum(1) > 1 - 1e-6).all()
    else:  # and the others really are spread
        assert (w_f[lengths >= 17].max(1).values < 0.5).all()
    close(out_f, out_r, atol=1e-5, rtol=0)
    close(w_f, w_r, atol=1e-5, rtol=0)
    close(gx_f, gx_r, atol=1e-5, rtol=0)
    assert gp_f.keys() == gp_r.keys()
    for name in gp_f:
        close(gp_f[name], gp_r[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad"])
def test_gpo_pools_under_inference_mode_and_no_grad_like_the_reference(grad_mode):
    # Users call plug-in GPO inside torch.inference_mode(); the sort runs in worker threads,
    # which do not inherit the caller's (thread-local) mode.
    fast, ref, features, lengths = _fast_and_reference("fresh")
    big = torch.randn(64, 40, 300, generator=torch.Generator().manual_seed(9))  # several worker tasks
    big_lengths = torch.randint(1, 41, (64,), generator=torch.Generator().manual_seed(3))
    context = torch.inference_mode if grad_mode == "inference_mode" else torch.no_grad
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the sort's worker threads run only with more than one torch thread
    try:
        for x, n in ((features, lengths), (big, big_lengths)):
            with context():
                out_f, w_f = fast(x, n)
                out_r, w_r = ref(x, n)
            close(out_f, out_r, atol=1e-5, rtol=0)
            close(w_f, w_r, atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(threads)


class DesignedGPO(GPO):
    """GPO with θ chosen by the test: 0.7 / (0.3 − m) on the top two positions and the small mass
    m spread evenly over the rest, where m is below the fast path's ``tail_eps``."""

    neglected = 5e-7

    def size_scores(self, sizes, n_max):
        theta = torch.full((len(sizes), n_max), 1.0)
        for row, n in enumerate(sizes.tolist()):
            if n == 1:
                theta[row, 0] = 1.0
                continue
            theta[row, 0], theta[row, 1] = 0.7, 0.3 - (self.neglected if n > 2 else 0.0)
            if n > 2:
                theta[row, 2:n] = self.neglected / (n - 2)
        return self.temperature * theta.double().log().float()


def test_gpo_truncated_sum_error_is_bounded_by_neglected_mass_times_max_abs_value():
    torch.manual_seed(0)
    pool = DesignedGPO()  # tail_eps 1e-6 > neglected mass: the fast path takes only the top 2
    exact = DesignedGPO(tail_eps=0.0)
    lengths = torch.tensor([60, 3, 33, 60, 1])
    features = 1000 * torch.randn(5, 60, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, weights = pool(features, lengths)
    out_exact, weights_exact = exact(features, lengths)
    assert torch.equal(weights, weights_exact)
    neglected = weights[:, 2:].sum(1, keepdim=True)
    assert (neglected < 1e-6).all() and neglected.max() > 1e-7
    max_abs = features.abs().amax(dim=(1, 2)).unsqueeze(1)
    err = (out - out_exact).abs()
    assert (err <= neglected * max_abs * (1 + 1e-9) + 1e-9).all()
    # and the exact path is the reference sum
    close(out_exact, rank_weighted_sum_reference(features, lengths, weights_exact), atol=1e-9, rtol=1e-12)


class CountingGPO(GPO):
    def __init__(self):
        super().__init__()
        self.calls: list[list[int]] = []

    def size_scores(self, sizes, n_max):
        self.calls.append(sizes.tolist())
        return super().size_scores(sizes, n_max)


def test_gpo_computes_coefficients_once_per_distinct_set_size():
    pool = CountingGPO()
    lengths = torch.tensor([5, 9, 5, 9, 9, 2, 5, 9])
    features = torch.randn(8, 9, 3)
    _, weights = pool(features, lengths)
    assert len(pool.calls) == 1
    assert sorted(pool.calls[0]) == [2, 5, 9]
    for size in (2, 5, 9):
        rows = weights[lengths == size]
        assert torch.equal(rows, rows[:1].expand_as(rows))


# ---------------------------------------------------------------------------------------------
# GPO against the authors' published algorithm, from a state dict with their key names


AUTHORS_KEYS = [
    "gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0",
    "gru.weight_ih_l0_reverse", "gru.weight_hh_l0_reverse", "gru.bias_ih_l0_reverse",
    "gru.bias_hh_l0_reverse", "linear.weight",
]


def _authors_state_dict(seed: int = 0, d_pe: int = 32, d_hidden: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"weight_ih": (3 * d_hidden, d_pe), "weight_hh": (3 * d_hidden, d_hidden),
              "bias_ih": (3 * d_hidden,), "bias_hh": (3 * d_hidden,)}
    state = {}
    for key in AUTHORS_KEYS[:-1]:
        kind = key.split(".")[1].rsplit("_l0", 1)[0]
        state[key] = 0.4 * torch.randn(*shapes[kind], generator=gen)
    state["linear.weight"] = 0.4 * torch.randn(1, d_hidden, generator=gen)
    return state


def _gru_pass(state, suffix, inputs):
    """One direction of a PyTorch-layout GRU over inputs (T × d_in), written out gate by gate."""
    w_ih, w_hh = state[f"gru.weight_ih_l0{suffix}"].double(), state[f"gru.weight_hh_l0{suffix}"].double()
    b_ih, b_hh = state[f"gru.bias_ih_l0{suffix}"].double(), state[f"gru.bias_hh_l0{suffix}"].double()
    h = torch.zeros(w_hh.shape[1], dtype=torch.float64)
    outs = []
    for x in inputs:
        gi = w_ih @ x + b_ih
        gh = w_hh @ h + b_hh
        i_r, i_z, i_n = gi.chunk(3)
        h_r, h_z, h_n = gh.chunk(3)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs)


def authors_gpo(state, features, lengths, d_pe=32):
    """The published GPO, re-implemented: PE → packed BiGRU (each set runs over its own length) →
    mean of the two directions → linear → scores masked to −10000 → softmax(·/0.1) → features
    sorted after masking padding with −10000, padding zeroed → weighted sum."""
    batch, n_max, _ = features.shape
    max_len = int(lengths.max())
    pe = _pe_reference(max_len, d_pe)
    scores = torch.full((batch, max_len), -10000.0, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        forward = _gru_pass(state, "", pe[:n])
        backward = _gru_pass(state, "_reverse", pe[:n].flip(0)).flip(0)
        hidden = (forward + backward) / 2
        scores[b, :n] = hidden @ state["linear.weight"].double()[0]
    weights = torch.softmax(scores / 0.1, dim=1)
    mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2)
    x = features[:, :max_len].double()
    x = x.masked_fill(~mask, -10000).sort(dim=1, descending=True).values.masked_fill(~mask, 0)
    return (x * weights.unsqueeze(2)).sum(1), weights


def test_authors_state_dict_loads_strictly_and_reproduces_their_algorithm():
    state = _authors_state_dict()
    assert sorted(GPO().state_dict().keys()) == sorted(AUTHORS_KEYS)
    pool, ref = GPO(), GPOReference()
    pool.load_state_dict(state, strict=True)
    ref.load_state_dict(state, strict=True)
    lengths = torch.tensor([36, 5, 20, 1, 36, 20])
    features = torch.randn(6, 36, 10, generator=torch.Generator().manual_seed(8))
    expected, expected_weights = authors_gpo(state, features, lengths)
    for model in (pool, ref):
        out, weights = model(features, lengths)
        close(out.double(), expected, atol=1e-5, rtol=0)
        close(weights.double(), expected_weights, atol=1e-5, rtol=0)


def test_gpo_rejects_a_state_dict_with_foreign_keys():
    state = _authors_state_dict()
    state["gru.weight_ih_l1"] = state["gru.weight_ih_l0"]
    with pytest.raises(RuntimeError, match="weight_ih_l1"):
        GPO().load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------
# Special cases GPO generalises


class FixedScoresGPO(GPO):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def size_scores(self, sizes, n_max):
        scores = torch.zeros(len(sizes), n_max)
        if self.kind == "one_hot":  # e^(−100/0.1) underflows to exactly 0
            scores[:, 1:] = -100.0
        return scores + 0 * super().size_scores(sizes, n_max)


@FEW
@given(batch=set_batches(max_n=14))
def test_gpo_special_cases_are_max_and_average_pooling(batch):
    features, lengths = batch
    close(FixedScoresGPO("one_hot")(features, lengths)[0], MaxPool()(features, lengths)[0])
    close(FixedScoresGPO("uniform")(features, lengths)[0], AvgPool()(features, lengths)[0])


@FEW
@given(batch=set_batches(max_n=12), extra=st.integers(0, 4))
def test_kmax_pooling_limits(batch, extra):
    features, lengths = batch
    n_max = features.shape[1]
    close(KMaxPool(n_max + extra)(features, lengths)[0], AvgPool()(features, lengths)[0])
    close(KMaxPool(1)(features, lengths)[0], MaxPool()(features, lengths)[0])
    # K in between: the mean of the top min(K, n) values, computed the obvious way
    k = max(1, n_max // 2)
    expected = torch.stack([features[b, :n].topk(min(k, n), dim=0).values.mean(0)
                            for b, n in enumerate(lengths.tolist())])
    close(KMaxPool(k)(features, lengths)[0], expected)


@FEW
@given(batch=set_batches(max_n=16), top=st.sampled_from([None, 1, 2, 3]), seed=st.integers(0, 2**31 - 1))
def test_rank_weighted_sum_equals_reference_including_gradients(batch, top, seed):
    """Spread weights (full sort) and weights concentrated on the ``top`` positions (the fast path
    selects only those), against the per-sample full sort."""
    features, lengths = batch
    n_max = features.shape[1]
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(features.shape[0], n_max, generator=gen)
    if top is not None:
        scores[:, top:] -= 40.0  # e^-40 ≈ 4e-18: far below the fast path's tail_eps
    scores = scores.masked_fill(padding_mask(lengths, n_max), -math.inf)
    results = []
    for fn in (rank_weighted_sum, rank_weighted_sum_reference):
        x = features.clone().requires_grad_(True)
        s = scores.clone().requires_grad_(True)
        w = torch.softmax(s, dim=1)
        out = fn(x, lengths, w)
        (out * torch.arange(1.0, features.shape[2] + 1)).sum().backward()
        results.append((out.detach(), x.grad, s.grad))
    for fast, ref in zip(*results):
        close(fast, ref)


# ---------------------------------------------------------------------------------------------
# GeM


def test_gem_p1_is_average_pooling_on_positive_inputs():
    features = torch.rand(4, 10, 6, generator=torch.Generator().manual_seed(0)) + 0.01
    lengths = torch.tensor([10, 3, 1, 7])
    close(GeMPool(p=1.0)(features, lengths)[0], AvgPool()(features, lengths)[0])


def test_gem_large_p_and_tiny_inputs_stay_finite_and_approach_the_max():
    features = (torch.rand(3, 10, 5, generator=torch.Generator().manual_seed(1)) * 1e-4 + 1e-5)
    features.requires_grad_(True)
    lengths = torch.tensor([10, 4, 1])
    pool = GeMPool(p=50.0)
    out, _ = pool(features, lengths)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(features.grad).all()
    assert torch.isfinite(pool.p.grad)
    top = MaxPool()(features.detach(), lengths)[0]
    mean = AvgPool()(features.detach(), lengths)[0]
    # power mean: between the mean and the max, and at least max · N^(−1/p)
    assert (out <= top * (1 + 1e-5)).all() and (out >= mean * (1 - 1e-5)).all()
    assert (out >= top * lengths.unsqueeze(1).float() ** (-1 / 50) * (1 - 1e-5)).all()
    close(GeMPool(p=2000.0)(features.detach(), lengths)[0], top, rtol=2e-3, atol=0)
    # naive x^p would underflow to 0 here: (1e-5)^50 = 1e-250
    assert (out > 0).all()


@pytest.mark.parametrize("fill", [math.nan, math.inf])
def test_gem_exponent_gradient_ignores_nan_and_inf_padding(fill):
    pool = GeMPool(p=3.0)
    features = pad_with(torch.rand(2, 5, 3) + 0.1, torch.tensor([5, 2]), fill)
    out, _ = pool(features, torch.tensor([5, 2]))
    out.sum().backward()
    assert torch.isfinite(pool.p.grad)


# ---------------------------------------------------------------------------------------------
# Size augmentation


@FEW
@given(batch=set_batches(max_n=16), mode=st.sampled_from(["region", "grid"]), p=st.sampled_from([0.2, 0.6, 1.0]),
       seed=st.integers(0, 2**31 - 1))
def test_size_augment_keeps_an_ordered_nonempty_subsequence_with_zero_padding(batch, mode, p, seed):
    features, lengths = batch
    features = pad_with(features, lengths, math.nan)
    # distinct values per element so each kept element can be found again
    features = features + torch.arange(features.shape[1]).view(1, -1, 1) * 100.0
    out, new_lengths = size_augment(features, lengths, mode=mode, p=p, generator=torch.Generator().manual_seed(seed))
    assert new_lengths.shape == lengths.shape
    assert (new_lengths >= 1).all() and (new_lengths <= lengths).all()
    assert out.shape[1] == int(new_lengths.max()) and out.shape[2] == features.shape[2]
    assert (out[padding_mask(new_lengths, out.shape[1])] == 0).all()
    for b, (n, m) in enumerate(zip(lengths.tolist(), new_lengths.tolist())):
        source = [tuple(row) for row in features[b, :n].tolist()]
        positions = [source.index(tuple(row)) for row in out[b, :m].tolist()]
        assert positions == sorted(set(positions))


def test_size_augment_drop_rates_match_the_paper():
    lengths = torch.full((400,), 100)
    features = torch.randn(400, 100, 2)
    _, kept = size_augment(features, lengths, mode="region", generator=torch.Generator().manual_seed(0))
    assert abs(1 - kept.float().mean().item() / 100 - 0.2) < 0.01
    _, kept = size_augment(features, lengths, mode="grid", generator=torch.Generator().manual_seed(0))
    # 80% of samples, each dropping 0.2·r with r ~ U(0.2, 1] (mean 0.6)
    assert abs(1 - kept.float().mean().item() / 100 - 0.8 * 0.2 * 0.6) < 0.01
    drop = 1 - kept.float() / 100
    assert 0.1 < (drop == 0).float().mean().item() < 0.3  # the 20% left untouched


def test_size_augment_none_is_identity_and_bad_mode_is_rejected():
    features, lengths = torch.randn(3, 6, 2), torch.tensor([6, 2, 4])
    out, new_lengths = size_augment(features, lengths, mode="none")
    assert torch.equal(out, features) and torch.equal(new_lengths, lengths)
    with pytest.raises(ValueError, match="region"):
        size_augment(features, lengths, mode="regions")


# ---------------------------------------------------------------------------------------------
# Bad input


BAD_INPUTS = [
    (lambda: (torch.randn(4, 3), torch.tensor([3, 3, 3, 3])), "3 dimensions"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([5, 5, 5])), "shape"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([[5, 5]])), "shape"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([5, 0])), "1..N"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([6, 5])), "1..N"),
    (lambda: (torch.ones(2, 5, 3, dtype=torch.long), torch.tensor([5, 5])), "floating"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([2.5, 5.0])), "whole"),
]


@pytest.mark.parametrize("name", POOLS)
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_raises_value_error_saying_what_is_wrong(name, case):
    make_inputs, message = BAD_INPUTS[case]
    features, lengths = make_inputs()
    with pytest.raises(ValueError, match=message):
        make_pool(name)(features, lengths)


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_size_augment_rejects_bad_input(case):
    make_inputs, message = BAD_INPUTS[case]
    features, lengths = make_inputs()
    with pytest.raises(ValueError, match=message):
        size_augment(features, lengths)


@pytest.mark.parametrize("name", ["gpoo", "kmax:x", "kmax:", "kmax:0", "kmax:-2", ""])
def test_build_pooling_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="kmax|unknown|pooling"):
        build_pooling(name, 8)


def test_build_pooling_builds_every_documented_name():
    kinds = {"gpo": GPO, "avg": AvgPool, "max": MaxPool, "kmax:20": KMaxPool, "gem": GeMPool}
    for name, cls in kinds.items():
        assert isinstance(build_pooling(name, 16), cls)
    assert build_pooling(" KMAX:7 ", 16).k == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64 takes torch's paths on the CPU
@pytest.mark.parametrize("top", [1, 2, 3, 4, None])
def test_fast_paths_are_exact_with_ties_and_short_sets(top, dtype):
    """ReLU features are full of ties (zeros). The fast paths — for θ concentrated on the top ranks,
    and the full sort for spread θ (``top`` None) — must count equal values with multiplicity, handle
    sets shorter than ``top``, and route exactly Σ_j θ_j · g to each (b, d) column in the backward pass."""
    gen = torch.Generator().manual_seed(top or 0)
    batch, n_max, dim = 6, 40, 8
    features = torch.randint(0, 3, (batch, n_max, dim), generator=gen).to(dtype)  # values 0, 1, 2
    features[:, :, 0] = 1.0  # a column that is all ties
    lengths = torch.tensor([40, 1, 2, 3, 17, 39])
    scores = torch.randn(batch, n_max, generator=gen)
    if top is not None:
        scores[:, top:] -= 40.0
    scores = scores.masked_fill(padding_mask(lengths, n_max), -math.inf)
    weights = torch.softmax(scores, dim=1).to(dtype)
    features_padded = features.clone()
    features_padded[padding_mask(lengths, n_max)] = float("nan")  # padding must not leak
    x = features_padded.clone().requires_grad_(True)
    out = rank_weighted_sum(x, lengths, weights)
    close(out, rank_weighted_sum_reference(features, lengths, weights))
    grad_out = torch.arange(1.0, dim + 1, dtype=dtype).expand(batch, dim)
    out.backward(grad_out)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[padding_mask(lengths, n_max)] == 0).all()
    close(x.grad.sum(1), grad_out * weights.sum(1, keepdim=True))


@pytest.mark.parametrize("shape", [(3, 7, 1), (4, 1, 5), (1, 6, 3), (5, 40, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_weighted_sum_never_writes_into_its_input(shape, dtype):
    """The spread path transposes the features into its own buffer and reuses it; when the transpose
    is a no-op (one dimension, one element), that buffer must still not be the input."""
    batch, n_max, dim = shape
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(shape, generator=gen, dtype=dtype)
    lengths = torch.randint(1, n_max + 1, (batch,), generator=gen)
    weights = torch.softmax(torch.randn(batch, n_max, generator=gen).masked_fill(padding_mask(lengths, n_max),
                                                                                 -math.inf), dim=1).to(dtype)
    x = features.clone().requires_grad_(True)
    rank_weighted_sum(x, lengths, weights).sum().backward()
    assert torch.equal(x.detach(), features)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sets_are_sorted_exactly_and_keep_their_dtype(dtype):
    """Under autocast the sets arrive in bf16/fp16: the CPU path sorts them exactly (as float32) and
    returns outputs and gradients in the input's dtype, equal to the reference up to that rounding."""
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(5, 30, 16, generator=gen).to(dtype)
    lengths = torch.tensor([30, 12, 1, 29, 8])
    weights = torch.softmax(torch.randn(5, 30, generator=gen).masked_fill(padding_mask(lengths, 30), -math.inf), 1)
    x = features.clone().requires_grad_(True)
    w = weights.to(dtype).requires_grad_(True)
    out = rank_weighted_sum(x, lengths, w)
    out.float().sum().backward()
    assert out.dtype == x.grad.dtype == w.grad.dtype == dtype
    expected = rank_weighted_sum_reference(features.float(), lengths, w.detach().float())
    close(out.float(), expected, atol=1e-6, rtol=torch.finfo(dtype).eps)  # one rounding to the dtype
    close(x.grad.float().sum(1), w.detach().float().sum(1, keepdim=True).expand(5, 16), atol=1e-2, rtol=1e-2)
