"""Pooling over sets of vectors: the Generalized Pooling Operator (GPO) and its baselines.

Every pooling module here has the same interface::

    pooled, weights = pool(features, lengths)

``features`` is a padded batch of sets (B × N × D, float), ``lengths`` holds the number of valid
elements of each set (B, integers in 1..N). Elements at index >= lengths[b] are padding: their
values (even NaN or inf) never change a result. ``pooled`` is B × D. ``weights`` is B × N: the
coefficient given to each *sorted* position (k-th largest value of each dimension) for the
rank-weighted pools, or to each element for the attention-style ones; zero on padding.

GPO (Chen et al., CVPR 2021): for every dimension independently, sort the N values in
descending order and take a weighted sum with coefficients θ_k that depend only on the position k
and the set size N. θ comes from a small generator: sin/cos positional encodings of k, read by a
bidirectional GRU, mapped to a score, softmax with temperature 0.1.

This module imports nothing else from vseinf: it is a plug-and-play layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = [
    "l2norm",
    "positional_encoding",
    "check_set_batch",
    "valid_mask",
    "RankWeightedPool",
    "GPO",
    "GPOReference",
    "InterpolatedIndexPool",
    "SinCosMLPPool",
    "IndexBiGRUPool",
    "AvgPool",
    "MaxPool",
    "KMaxPool",
    "GeMPool",
    "FSPool",
    "ClsPool",
    "SelfAttentionPool",
    "sorted_values",
    "rank_weighted_sum",
    "rank_weighted_sum_reference",
    "size_augment",
    "build_pooling",
    "POOLING_NAMES",
]


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Scale ``x`` to unit l2 norm along ``dim`` (zero vectors stay zero)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def positional_encoding(length: int, dim: int, device=None) -> torch.Tensor:
    """Transformer sin/cos encoding of positions 0..length-1 (length × dim), 0-based like the authors."""
    if dim % 2:
        raise ValueError(f"positional encoding size must be even, got d_pe={dim}")
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


# ---------------------------------------------------------------------------------------------
# Input checks and masks


def check_set_batch(features: torch.Tensor, lengths) -> torch.Tensor:
    """Validate a padded set batch; return ``lengths`` as a LongTensor on the features' device.

    Raises ValueError saying what was expected, so a user never gets a shape error from deep inside.
    """
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch.Tensor of shape B×N×D, got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must have 3 dimensions (B×N×D), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    batch, n_max, _ = features.shape
    if lengths is None:
        return torch.full((batch,), n_max, dtype=torch.long, device=features.device)
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point():
        if not torch.equal(lengths, lengths.round()):
            raise ValueError("lengths must be whole numbers")
    elif lengths.dtype == torch.bool or lengths.is_complex():
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must have shape ({batch},) to match features {tuple(features.shape)}, "
                         f"got {tuple(lengths.shape)}")
    lengths = lengths.to(device=features.device, dtype=torch.long)
    if batch:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > n_max:
            raise ValueError(f"every length must be in 1..N={n_max} (the set dimension of features), "
                             f"got values in {lo}..{hi}")
    return lengths


def valid_mask(lengths: torch.Tensor, n_max: int) -> torch.Tensor:
    """B × n_max boolean mask, True at valid (non-padding) positions."""
    return torch.arange(n_max, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# The weighted sum over sorted values: reference and fast path


def rank_weighted_sum_reference(features: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Obviously-right twin of :func:`rank_weighted_sum`: one sample at a time, a full sort each."""
    out = []
    for b in range(features.shape[0]):
        n = int(lengths[b])
        values = features[b, :n].sort(dim=0, descending=True).values  # n × D
        out.append((weights[b, :n].unsqueeze(1) * values).sum(0))
    return torch.stack(out) if out else features.new_zeros(0, features.shape[2])


class _SortedWeightedSum(torch.autograd.Function):
    """Σ_k w[b,k] · sort_desc(x[b, :, d])[k], sorting along a contiguous axis, with a hand-written
    backward: the gradient of each element is g[b,d] · w[b, its rank] (a scatter), and the gradient of
    w is the sorted values contracted with g. Avoids the strided sort and the copies autograd makes."""

    @staticmethod
    def forward(ctx, features, weights, mask):
        xt = features.detach().transpose(1, 2).contiguous()  # B × D × N, sortable rows
        xt.masked_fill_(~mask.unsqueeze(1), float("-inf"))
        values, order = xt.sort(dim=2, descending=True)
        values.masked_fill_(~mask.unsqueeze(1), 0.0)  # padding sorted last; -inf would give NaN
        w = weights.detach().to(values.dtype)
        ctx.save_for_backward(values, order, w)
        return torch.bmm(values, w.unsqueeze(2)).squeeze(2)

    @staticmethod
    def backward(ctx, grad_out):
        values, order, w = ctx.saved_tensors
        grad_features = grad_weights = None
        if ctx.needs_input_grad[0]:
            per_rank = grad_out.unsqueeze(2) * w.unsqueeze(1)  # B × D × N, zero at padded ranks
            grad_features = torch.empty_like(per_rank).scatter_(2, order, per_rank).transpose(1, 2)
        if ctx.needs_input_grad[1]:
            grad_weights = torch.bmm(grad_out.unsqueeze(1).to(values.dtype), values).squeeze(1)
        return grad_features, grad_weights, None


def rank_weighted_sum(features: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor,
                      tail_eps: float = 1e-6) -> torch.Tensor:
    """Σ_k weights[b, k] · (k-th largest of features[b, :lengths[b], d]) for every b, d.

    ``weights`` is B × N, zero at padded positions, each row summing to 1. When all but ``tail_eps`` of
    every row's mass sits on the first K positions (a trained GPO on region features is close to max
    pooling), only the top K values are selected instead of fully sorting: the neglected part of the
    sum is at most ``tail_eps`` × max|feature|. With spread weights it sorts once along a contiguous
    axis and contracts with one batched matrix product.
    """
    batch, n_max, dim = features.shape
    mask = valid_mask(lengths, n_max)
    k = n_max
    if tail_eps > 0 and n_max > 1:
        with torch.no_grad():
            tail = 1.0 - weights.detach().float().cumsum(1)  # mass beyond positions 0..k
            k = int(min(int(((tail > tail_eps).sum(1) + 1).max()), n_max))
    if k > n_max // 4:
        return _SortedWeightedSum.apply(features, weights, mask)
    if k <= _REPEATED_MAX_K:
        return _TopWeightedSum.apply(features, weights, lengths, mask, k)
    # Padding must lose every comparison and must not leak NaN/inf: -inf, then zero after selecting.
    filled = features.masked_fill(~mask.unsqueeze(2), float("-inf"))
    top = filled.topk(k, dim=1, largest=True, sorted=True).values  # B × k × D
    top = top.masked_fill(~mask[:, :k].unsqueeze(2), 0.0)
    return torch.bmm(weights[:, :k].unsqueeze(1).to(top.dtype), top).squeeze(1)


# Up to this many top ranks are taken by repeated max (each a cheap contiguous reduction) instead of
# ``topk`` along the set axis, which costs more than two max reductions on the CPU.
_REPEATED_MAX_K = 4


class _TopWeightedSum(torch.autograd.Function):
    """Σ_{j<k} w[b,j] · (j-th largest of features[b, :len_b, d]) by k rounds of "max, then knock the
    winner out". Ties are exact: knocking out one winner leaves its equal, so the next round returns the
    same value again. The backward pass sends g[b,d] · w[b,j] to the j-th winner (a scatter)."""

    @staticmethod
    def forward(ctx, features, weights, lengths, mask, k):
        work = features.detach().masked_fill(~mask.unsqueeze(2), float("-inf"))  # own copy
        w = weights.detach()
        out = None
        winners, values = [], []
        for j in range(k):
            value, index = work.max(dim=1)  # B × D
            # Sets with at most j elements have no j-th value (-inf); their w[:, j] is 0 anyway.
            value = value.masked_fill(~(lengths > j).unsqueeze(1), 0.0)
            term = w[:, j:j + 1].to(value.dtype) * value
            out = term if out is None else out + term
            winners.append(index)
            values.append(value)
            if j + 1 < k:
                work.scatter_(1, index.unsqueeze(1), float("-inf"))
        ctx.save_for_backward(torch.stack(winners, 1), torch.stack(values, 1), w)
        ctx.n_max = features.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        winners, values, w = ctx.saved_tensors  # B × k × D, B × k × D, B × N
        k = winners.shape[1]
        grad_features = grad_weights = None
        if ctx.needs_input_grad[0]:
            per_rank = grad_out.unsqueeze(1) * w[:, :k].unsqueeze(2).to(grad_out.dtype)  # B × k × D
            batch, _, dim = per_rank.shape
            grad_features = per_rank.new_zeros(batch, ctx.n_max, dim).scatter_add_(1, winners, per_rank)
        if ctx.needs_input_grad[1]:
            grad_weights = w.new_zeros(w.shape)
            grad_weights[:, :k] = torch.einsum("bd,bkd->bk", grad_out.to(values.dtype), values).to(w.dtype)
        return grad_features, grad_weights, None, None, None


# ---------------------------------------------------------------------------------------------
# Rank-weighted pools: a coefficient generator + the sorted weighted sum


class RankWeightedPool(nn.Module):
    """Base class: θ depends only on (k, N); subclasses produce the scores for one set size at a time.

    Because θ depends only on the set size, ``forward`` computes it once per *distinct* size in the
    batch (``coefficients``) and gathers it for every sample.
    """

    temperature: float = 0.1

    def __init__(self, tail_eps: float = 1e-6):
        super().__init__()
        self.tail_eps = tail_eps

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        """Scores (U × n_max) for the distinct set sizes ``sizes`` (U); positions >= size are ignored."""
        raise NotImplementedError

    def coefficients(self, sizes: torch.Tensor, n_max: int | None = None) -> torch.Tensor:
        """θ for each size in ``sizes`` (U × n_max): softmax(score / T) over the valid positions, 0 after."""
        sizes = torch.as_tensor(sizes, dtype=torch.long)
        if n_max is None:
            n_max = int(sizes.max())
        # The generator is tiny and its softmax is sharp (T = 0.1): keep it in fp32 under autocast.
        with torch.autocast(sizes.device.type, enabled=False):
            scores = self.size_scores(sizes, n_max)
        mask = valid_mask(sizes.to(scores.device), n_max)
        scores = scores.float().masked_fill(~mask, float("-inf"))
        return torch.softmax(scores / self.temperature, dim=1)

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        n_max = features.shape[1]
        sizes, inverse = torch.unique(lengths, return_inverse=True)
        theta = self.coefficients(sizes, n_max)  # U × N
        weights = theta[inverse].to(features.dtype)  # B × N
        pooled = rank_weighted_sum(features, lengths, weights, self.tail_eps)
        return pooled, weights


def _run_bigru(gru: nn.GRU, inputs: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Run a bidirectional GRU on U × n_max inputs with valid lengths ``sizes``; average directions."""
    packed = pack_padded_sequence(inputs, sizes.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=inputs.shape[1])
    half = out.shape[2] // 2
    return (out[..., :half] + out[..., half:]) / 2


class _GRUScan(torch.autograd.Function):
    """A GRU recurrence over precomputed input gates, several weight sets in one batch, with a
    hand-written backward pass.

    Rows of the batch may use different recurrent weights (``row_weight`` picks one of the stacked
    sets), so GPO's forward direction (shared by all set sizes) and its reverse direction (one row per
    size) run in one loop. Autograd through ``nn.GRU`` on the CPU costs several small kernels per step
    in the backward pass; here the parameter gradients are two contractions after the loop.

    Inputs: gi (R × T × 3H, input projections incl. bias, gate order r, z, n as in ``nn.GRU``),
    w_hh (S × 3H × H), b_hh (S × 3H), row_weight (R, long). Output: hidden states R × T × H (h0 = 0).
    """

    @staticmethod
    def forward(ctx, gi, w_hh, b_hh, row_weight):
        rows, steps, three_h = gi.shape
        hid = three_h // 3
        w_rows = w_hh[row_weight]  # R × 3H × H
        w_rows_t = w_rows.transpose(1, 2)  # R × H × 3H
        b_rows = b_hh[row_weight].unsqueeze(1)  # R × 1 × 3H
        h = gi.new_zeros(rows, hid)
        hs = gi.new_empty(steps, rows, hid)
        h_prev = gi.new_empty(steps, rows, hid)
        gates = gi.new_empty(steps, rows, three_h)  # r, z, n
        gh_n = gi.new_empty(steps, rows, hid)
        for t in range(steps):
            gh = torch.baddbmm(b_rows, h.unsqueeze(1), w_rows_t).squeeze(1)
            g = gi[:, t]
            rz = torch.sigmoid(g[:, :2 * hid] + gh[:, :2 * hid])
            r, z = rz[:, :hid], rz[:, hid:]
            n = torch.tanh(g[:, 2 * hid:] + r * gh[:, 2 * hid:])
            h_prev[t] = h
            h = n + z * (h - n)
            hs[t] = h
            gates[t, :, :2 * hid] = rz
            gates[t, :, 2 * hid:] = n
            gh_n[t] = gh[:, 2 * hid:]
        ctx.save_for_backward(w_rows, h_prev, gates, gh_n, row_weight)
        ctx.n_sets = w_hh.shape[0]
        return hs.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_hs):
        w_rows, h_prev, gates, gh_n, row_weight = ctx.saved_tensors
        steps, rows, hid = h_prev.shape
        grad_hs = grad_hs.transpose(0, 1)  # T × R × H
        d_gi = grad_hs.new_empty(steps, rows, 3 * hid)
        d_gh = grad_hs.new_empty(steps, rows, 3 * hid)
        dh = grad_hs.new_zeros(rows, hid)
        for t in range(steps - 1, -1, -1):
            dh = dh + grad_hs[t]
            r, z, n = gates[t, :, :hid], gates[t, :, hid:2 * hid], gates[t, :, 2 * hid:]
            da_n = dh * (1 - z) * (1 - n * n)
            da_z = dh * (h_prev[t] - n) * z * (1 - z)
            da_r = da_n * gh_n[t] * r * (1 - r)
            d_gi[t, :, :hid] = da_r
            d_gi[t, :, hid:2 * hid] = da_z
            d_gi[t, :, 2 * hid:] = da_n
            d_gh[t, :, :2 * hid] = d_gi[t, :, :2 * hid]
            d_gh[t, :, 2 * hid:] = da_n * r
            dh = dh * z + torch.bmm(d_gh[t].unsqueeze(1), w_rows).squeeze(1)
        d_w_rows = torch.einsum("trg,trh->rgh", d_gh, h_prev)
        d_w = d_w_rows.new_zeros(ctx.n_sets, *d_w_rows.shape[1:]).index_add_(0, row_weight, d_w_rows)
        d_b = d_gh.new_zeros(ctx.n_sets, 3 * hid).index_add_(0, row_weight, d_gh.sum(0))
        return d_gi.transpose(0, 1), d_w, d_b, None


def _bigru_over_positions(gru: nn.GRU, inputs: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Directions-averaged BiGRU outputs over positions 0..T-1 for every set size in ``sizes``.

    ``inputs`` (T × d) encode the positions and do not depend on the size, so the forward direction's
    outputs are the same for every size (one row), and only the reverse direction — which starts at
    position N-1 — needs a row per size. Equal to running ``gru`` on each size's packed sequence.
    Returns U × T × H (rows past a size's end are meaningless and must be masked by the caller).
    """
    steps = inputs.shape[0]
    gi_fwd = F.linear(inputs, gru.weight_ih_l0, gru.bias_ih_l0)  # T × 3H
    gi_rev = F.linear(inputs, gru.weight_ih_l0_reverse, gru.bias_ih_l0_reverse)
    # Reverse row u at step t reads position N_u - 1 - t (clamped: steps past the start are unused).
    k = torch.arange(steps, device=inputs.device)
    pos = (sizes.unsqueeze(1) - 1 - k.unsqueeze(0)).clamp_min(0)  # U × T
    gi = torch.cat([gi_fwd.unsqueeze(0), gi_rev[pos]], dim=0)
    w_hh = torch.stack([gru.weight_hh_l0, gru.weight_hh_l0_reverse])
    b_hh = torch.stack([gru.bias_hh_l0, gru.bias_hh_l0_reverse])
    row_weight = torch.ones(len(sizes) + 1, dtype=torch.long, device=inputs.device)
    row_weight[0] = 0
    hs = _GRUScan.apply(gi, w_hh, b_hh, row_weight)  # (1 + U) × T × H
    # The reverse output at position k was produced at step N_u - 1 - k: the same index map.
    rev = hs[1:].gather(1, pos.unsqueeze(2).expand(-1, -1, hs.shape[2]))
    return (hs[:1] + rev) / 2


def sorted_values(features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each dimension's valid values in descending order (B × N × D), zero at the padded ranks.

    Differentiable (through ``sort``); padding, even NaN, gets no gradient because it is replaced
    before the sort and after it.
    """
    mask = valid_mask(lengths, features.shape[1]).unsqueeze(2)
    values = features.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
    return values.masked_fill(~mask, 0.0)


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(scores / T) over dim 1 (positions) of U × N [× P] scores; masked positions get 0."""
    if scores.dim() == 3:
        mask = mask.unsqueeze(2)
    return torch.softmax(scores.float().masked_fill(~mask, float("-inf")) / temperature, dim=1)


def _generator_precision(device):
    """The variants' coefficient generators run in float32 even under autocast: θ is a softmax with
    temperature 0.1 over small score differences, and ``nn.GRU`` has no bf16 autocast rule on CPU."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(kind, enabled=False)


class GPO(RankWeightedPool):
    """Generalized Pooling Operator (SPEC §2): sin/cos position encoding → BiGRU → linear → softmax(·/0.1).

    Args:
        d_pe: size of the positional encoding of each sorted position (paper: 32).
        d_hidden: hidden size of the bidirectional GRU; directions are averaged (paper: 32).
        tail_eps: coefficient mass that may be skipped when θ is concentrated on the top positions
            (see :func:`rank_weighted_sum`); 0 always sorts fully.
        per_dimension: D to emit D scores per position, one θ per feature dimension (supplementary
            Table 7); the features must then have dimension D. None: one θ for all dimensions.
        feature_dim: D to let the generator also read each position's sorted values (a D-vector,
            projected to ``d_feature``) beside its encoding (supplementary Table 8); θ then depends
            on the sample and is computed per sample. None: θ depends only on the set size.
        d_feature: size the sorted values are projected to when ``feature_dim`` is set.
        sequence_model: "gru" (the paper) or "transformer" (a 1-layer transformer encoder of width
            ``d_hidden``, 4 heads, on the encodings; supplementary Table 3).
        temperature: softmax temperature of θ (paper: 0.1).

    With the defaults this is exactly the paper's GPO: submodules ``gru`` and ``linear`` use the
    authors' names, so their GPO state dicts load with ``strict=True``. The variants' generators run
    in float32 even under autocast.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, tail_eps: float = 1e-6, *,
                 per_dimension: int | None = None, feature_dim: int | None = None, d_feature: int = 16,
                 sequence_model: str = "gru", temperature: float = 0.1):
        super().__init__(tail_eps)
        if sequence_model not in ("gru", "transformer"):
            raise ValueError(f"GPO sequence_model must be 'gru' or 'transformer', got {sequence_model!r}")
        for name, value in (("per_dimension", per_dimension), ("feature_dim", feature_dim)):
            if value is not None and int(value) < 1:
                raise ValueError(f"GPO {name} must be a positive feature dimension or None, got {value!r}")
        if not temperature > 0:
            raise ValueError(f"GPO temperature must be positive, got {temperature!r}")
        self.d_pe = d_pe
        self.d_hidden = d_hidden
        self.per_dimension = None if per_dimension is None else int(per_dimension)
        self.feature_dim = None if feature_dim is None else int(feature_dim)
        self.sequence_model = sequence_model
        self.temperature = float(temperature)
        d_in = d_pe + (d_feature if self.feature_dim else 0)
        # Modules are created in the paper's order (gru, linear) so that GPO() draws the same initial
        # weights from the random stream as before the variants existed.
        if sequence_model == "gru":
            self.gru = nn.GRU(d_in, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        else:
            # supp. Table 3: a 1-layer transformer encoder over the position encodings. No dropout
            # (the GRU has none); the sin/cos inputs already carry the positions.
            self.transformer_in = nn.Linear(d_in, d_hidden)
            self.transformer = nn.TransformerEncoderLayer(d_hidden, nhead=4 if d_hidden % 4 == 0 else 1,
                                                          dim_feedforward=2 * d_hidden, dropout=0.0,
                                                          batch_first=True)
        self.linear = nn.Linear(d_hidden, self.per_dimension or 1, bias=False)
        if self.feature_dim:
            # supp. Table 8: the sorted values of each position, squeezed to d_feature numbers.
            self.feature_proj = nn.Linear(self.feature_dim, d_feature)
        self._pe_cache: dict[tuple, torch.Tensor] = {}

    @property
    def is_paper_gpo(self) -> bool:
        """True for the paper's generator (BiGRU, one θ shared by all dimensions, θ a function of N)."""
        return self.sequence_model == "gru" and self.per_dimension is None and self.feature_dim is None

    def _pe(self, n_max: int, device) -> torch.Tensor:
        key = (n_max, str(device))
        if key not in self._pe_cache:
            self._pe_cache[key] = positional_encoding(n_max, self.d_pe, device)
        return self._pe_cache[key]

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        device = self.linear.weight.device
        sizes = sizes.to(device)
        pe = self._pe(n_max, device).to(self.linear.weight.dtype)
        if self.is_paper_gpo:
            return self.linear(_bigru_over_positions(self.gru, pe, sizes)).squeeze(2)
        if self.feature_dim:
            raise ValueError("this GPO's coefficients depend on the feature values (feature_dim is set), "
                             "not only on the set size: call it on features instead")
        with _generator_precision(device):
            if self.sequence_model == "gru":
                hidden = _bigru_over_positions(self.gru, pe.float(), sizes)
            else:
                inputs = pe.float().unsqueeze(0).expand(len(sizes), -1, -1)
                hidden = self._transformer_hidden(inputs, valid_mask(sizes, n_max))
            scores = self.linear(hidden)  # U × n_max × P
        return scores.squeeze(2) if self.per_dimension is None else scores

    def _transformer_hidden(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.transformer_in(inputs), src_key_padding_mask=~mask)

    def coefficients(self, sizes: torch.Tensor, n_max: int | None = None) -> torch.Tensor:
        """θ for each size in ``sizes``: U × n_max, or U × n_max × D with ``per_dimension=D``."""
        if self.per_dimension is None:
            return super().coefficients(sizes, n_max)
        sizes = torch.as_tensor(sizes, dtype=torch.long)
        if n_max is None:
            n_max = int(sizes.max())
        # The generator is tiny and its softmax is sharp (T = 0.1): keep it in fp32 under autocast.
        with torch.autocast(sizes.device.type, enabled=False):
            scores = self.size_scores(sizes, n_max)
        return _masked_softmax(scores, valid_mask(sizes.to(scores.device), n_max), self.temperature)

    def forward(self, features: torch.Tensor, lengths=None):
        if self.per_dimension is None and self.feature_dim is None:
            return super().forward(features, lengths)  # θ shared by all dimensions, one per set size
        lengths = check_set_batch(features, lengths)
        batch, n_max, dim = features.shape
        for name, expected in (("per_dimension", self.per_dimension), ("feature_dim", self.feature_dim)):
            if expected is not None and expected != dim:
                raise ValueError(f"this GPO was built with {name}={expected} but the features have "
                                 f"dimension {dim}")
        mask = valid_mask(lengths, n_max)
        values = sorted_values(features, lengths)  # B × N × D, descending per dimension, 0 on padding
        if self.feature_dim:
            # θ depends on the sample: one generator pass per sample, packed to its own length.
            with _generator_precision(features.device):
                pe = self._pe(n_max, features.device).unsqueeze(0).expand(batch, -1, -1)
                inputs = torch.cat([pe, self.feature_proj(values.float())], dim=2)
                if self.sequence_model == "gru":
                    hidden = _run_bigru(self.gru, inputs, lengths)
                else:
                    hidden = self._transformer_hidden(inputs, mask)
                theta = _masked_softmax(self.linear(hidden), mask, self.temperature)  # B × N × P
        else:
            sizes, inverse = torch.unique(lengths, return_inverse=True)
            theta = self.coefficients(sizes, n_max)[inverse]  # B × N × D
        pooled = (values * theta.to(values.dtype)).sum(1)
        return pooled, theta.mean(2).to(features.dtype)


class GPOReference(nn.Module):
    """Obviously-right GPO: per sample, its own generator pass and a full sort. Same parameters as GPO.

    Used to test :class:`GPO`'s fast path; load a GPO state dict into it with ``strict=True``.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32):
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def theta(self, n: int) -> torch.Tensor:
        pe = positional_encoding(n, self.d_pe, self.linear.weight.device).unsqueeze(0)
        out, _ = self.gru(pe)  # no padding: a plain run is the packed run
        out = (out[..., : out.shape[2] // 2] + out[..., out.shape[2] // 2:]) / 2
        return torch.softmax(self.linear(out).squeeze(0).squeeze(1) / 0.1, dim=0)

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        batch, n_max, _ = features.shape
        weights = features.new_zeros(batch, n_max)
        pooled = []
        for b in range(batch):
            n = int(lengths[b])
            theta = self.theta(n)
            weights[b, :n] = theta
            values = features[b, :n].sort(dim=0, descending=True).values
            pooled.append((theta.unsqueeze(1) * values).sum(0))
        return torch.stack(pooled), weights


class InterpolatedIndexPool(RankWeightedPool):
    """Synthetic-study generator "index + interpolated vector" (FSPool-style).

    A learnable score vector over ``n_pieces`` + 1 evenly spaced knots on [0, 1]; a set of size N reads
    it at positions k / (N - 1) by linear interpolation.

    Args:
        n_pieces: number of linear pieces of the score curve.
    """

    def __init__(self, n_pieces: int = 20, tail_eps: float = 1e-6):
        super().__init__(tail_eps)
        self.n_pieces = n_pieces
        self.knots = nn.Parameter(torch.zeros(n_pieces + 1))

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        device = self.knots.device
        sizes = sizes.to(device).float().unsqueeze(1)
        k = torch.arange(n_max, device=device, dtype=torch.float32).unsqueeze(0)
        ratio = (k / (sizes - 1).clamp_min(1)).clamp(0, 1) * self.n_pieces  # U × n_max in [0, n_pieces]
        left = ratio.floor().long().clamp(max=self.n_pieces - 1)
        frac = ratio - left
        return self.knots[left] * (1 - frac) + self.knots[left + 1] * frac


class SinCosMLPPool(RankWeightedPool):
    """Synthetic-study generator "sin/cos + MLP": each position scored independently of the set size's
    other positions (an MLP on [PE(k), PE-of-size features]) — here the size enters through k / N.

    Args:
        d_pe: positional encoding size.
        d_hidden: MLP hidden size.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, tail_eps: float = 1e-6):
        super().__init__(tail_eps)
        self.d_pe = d_pe
        self.mlp = nn.Sequential(nn.Linear(d_pe + 1, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_hidden),
                                 nn.ReLU(), nn.Linear(d_hidden, 1, bias=False))

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        device = self.mlp[0].weight.device
        sizes = sizes.to(device)
        pe = positional_encoding(n_max, self.d_pe, device).unsqueeze(0).expand(len(sizes), -1, -1)
        rel = torch.arange(n_max, device=device).unsqueeze(0) / sizes.unsqueeze(1).float()
        return self.mlp(torch.cat([pe, rel.unsqueeze(2)], dim=2)).squeeze(2)


class IndexBiGRUPool(RankWeightedPool):
    """Synthetic-study generator "index embedding + BiGRU": a learned embedding per position k (up to
    ``max_positions``) in place of the sin/cos encoding. Positions beyond the table share its last row,
    which is why this generator extrapolates poorly to larger sets.

    Args:
        d_embed: embedding size per position.
        d_hidden: BiGRU hidden size (directions averaged).
        max_positions: size of the position table.
    """

    def __init__(self, d_embed: int = 32, d_hidden: int = 32, max_positions: int = 128, tail_eps: float = 1e-6):
        super().__init__(tail_eps)
        self.max_positions = max_positions
        self.embed = nn.Embedding(max_positions, d_embed)
        self.gru = nn.GRU(d_embed, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        device = self.linear.weight.device
        sizes = sizes.to(device)
        idx = torch.arange(n_max, device=device).clamp(max=self.max_positions - 1)
        emb = self.embed(idx).unsqueeze(0).expand(len(sizes), -1, -1)
        emb = emb * valid_mask(sizes, n_max).unsqueeze(2)
        return self.linear(_run_bigru(self.gru, emb, sizes)).squeeze(2)


# ---------------------------------------------------------------------------------------------
# Fixed pools


class AvgPool(nn.Module):
    """Mean over the valid elements (θ_k = 1/N)."""

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        mask = valid_mask(lengths, features.shape[1])
        weights = mask.to(features.dtype) / lengths.unsqueeze(1).to(features.dtype)
        pooled = features.masked_fill(~mask.unsqueeze(2), 0.0).sum(1) / lengths.unsqueeze(1).to(features.dtype)
        return pooled, weights


class MaxPool(nn.Module):
    """Per-dimension maximum over the valid elements (θ_1 = 1)."""

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        mask = valid_mask(lengths, features.shape[1])
        pooled = features.masked_fill(~mask.unsqueeze(2), float("-inf")).max(dim=1).values
        weights = torch.zeros_like(mask, dtype=features.dtype)
        weights[:, 0] = 1.0
        return pooled, weights


class KMaxPool(nn.Module):
    """Mean of the K largest values of each dimension (all of them when the set has fewer than K).

    Args:
        k: how many of the top values to average.
    """

    def __init__(self, k: int):
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"K-max pooling needs k >= 1, got {k}")
        self.k = int(k)

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        n_max = features.shape[1]
        kk = torch.clamp(lengths, max=self.k)
        weights = valid_mask(kk, n_max).to(features.dtype) / kk.unsqueeze(1).to(features.dtype)
        return rank_weighted_sum(features, lengths, weights, tail_eps=0.0), weights


class GeMPool(nn.Module):
    """Generalized-mean pooling with a learnable exponent p: (mean_n x_n^p)^(1/p) per dimension.

    Computed in log space, (logsumexp(p·log x) − log N) / p, so large p or small x neither overflow
    nor underflow (the usual ``x.pow(p).mean().pow(1/p)`` blows up). GeM is defined on positive values:
    inputs are clamped to ``eps``.

    Args:
        p: initial exponent (3 is the usual start).
        eps: lower clamp of the inputs.
        p_min: p is kept >= p_min.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, p_min: float = 1.0):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps
        self.p_min = p_min

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        mask = valid_mask(lengths, features.shape[1])
        p = self.p.clamp_min(self.p_min)
        # Padding becomes 1 before the log: NaN/inf there would otherwise poison p's gradient.
        logx = features.float().masked_fill(~mask.unsqueeze(2), 1.0).clamp_min(self.eps).log()
        scaled = (p * logx).masked_fill(~mask.unsqueeze(2), float("-inf"))
        log_mean = torch.logsumexp(scaled, dim=1) - lengths.float().log().unsqueeze(1)
        pooled = torch.exp(log_mean / p).to(features.dtype)
        weights = mask.to(features.dtype) / lengths.unsqueeze(1).to(features.dtype)
        return pooled, weights


class FSPool(nn.Module):
    """Featurewise sort pooling (Zhang et al., 2019), the paper's FSPool baseline.

    Each dimension d has its own learnable piecewise-linear curve over [0, 1] (``n_pieces`` + 1 knots);
    a set of size N reads it at k / (N − 1) for its sorted positions k = 0..N−1, and the pooled value
    is Σ_k curve_d(k) · (k-th largest value of dimension d) / N. Unlike GPO's θ the coefficients are
    not normalised (as in FSPool) and may be negative; the 1/N only fixes the scale (it cancels in the
    l2-normalised embedding). The knots start at 1, i.e. average pooling.

    Args:
        dim: feature dimension D (one curve per dimension).
        n_pieces: number of linear pieces of each curve.
    """

    def __init__(self, dim: int, n_pieces: int = 20):
        super().__init__()
        if dim is None or int(dim) < 1 or int(n_pieces) < 1:
            raise ValueError(f"FSPool needs dim >= 1 and n_pieces >= 1, got dim={dim!r}, n_pieces={n_pieces!r}")
        self.dim = int(dim)
        self.n_pieces = int(n_pieces)
        self.weight = nn.Parameter(torch.ones(self.dim, self.n_pieces + 1))

    def curves(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        """Coefficients (U × n_max × D) for the set sizes ``sizes``, divided by N, zero past each size."""
        device = self.weight.device
        sizes = torch.as_tensor(sizes, dtype=torch.long, device=device)
        k = torch.arange(n_max, device=device, dtype=torch.float32).unsqueeze(0)
        n = sizes.float().unsqueeze(1)
        ratio = (k / (n - 1).clamp_min(1)).clamp(0, 1) * self.n_pieces  # U × n_max in [0, n_pieces]
        left = ratio.floor().long().clamp(max=self.n_pieces - 1)
        frac = (ratio - left).unsqueeze(2)
        w = self.weight.t()  # (n_pieces + 1) × D
        curve = w[left] * (1 - frac) + w[left + 1] * frac  # U × n_max × D
        return curve * (valid_mask(sizes, n_max).unsqueeze(2) / n.unsqueeze(2))

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        if features.shape[2] != self.dim:
            raise ValueError(f"FSPool was built for dimension {self.dim}, got features of dimension "
                             f"{features.shape[2]}")
        sizes, inverse = torch.unique(lengths, return_inverse=True)
        coef = self.curves(sizes, features.shape[1])[inverse]  # B × N × D
        values = sorted_values(features, lengths)
        pooled = (values * coef.to(values.dtype)).sum(1)
        return pooled, coef.mean(2).to(features.dtype)


class ClsPool(nn.Module):
    """The first element of each set (the [CLS] token of a transformer's output).

    Not permutation invariant, by design: it is meaningful for text, whose first token is [CLS].
    """

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        weights = torch.zeros(features.shape[:2], dtype=features.dtype, device=features.device)
        weights[:, 0] = 1.0
        return features[:, 0], weights


class SelfAttentionPool(nn.Module):
    """One layer of multi-head self-attention over the set, with a residual, averaged over the set.

    Queries and keys are learned projections to ``n_heads`` × ``d_key``; the values are the inputs
    themselves, split into ``n_heads`` slices (no value/output projection, which keeps the layer cheap
    at D = 1024 on a CPU). No positional encoding, so the result is permutation invariant. With
    y_n = x_n + Σ_m a_nm x_m (per head) and the pooled vector (1/2N) Σ_n y_n, each element's weight in
    head h is (1/N + mean_n a^h_nm) / 2, a distribution over the set; ``weights`` averages it over heads.

    Args:
        dim: feature dimension D (divisible by ``n_heads``).
        n_heads: attention heads.
        d_key: query/key size per head.
    """

    def __init__(self, dim: int, n_heads: int = 8, d_key: int = 32):
        super().__init__()
        if dim is None or int(dim) < 1:
            raise ValueError(f"SelfAttentionPool needs the feature dimension, got dim={dim!r}")
        dim = int(dim)
        if dim % n_heads:
            n_heads = math.gcd(dim, n_heads)  # small test dimensions: fewer heads
        self.dim, self.n_heads, self.d_key = dim, n_heads, d_key
        self.query = nn.Linear(dim, n_heads * d_key)
        self.key = nn.Linear(dim, n_heads * d_key)

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        batch, n_max, dim = features.shape
        if dim != self.dim:
            raise ValueError(f"SelfAttentionPool was built for dimension {self.dim}, got {dim}")
        mask = valid_mask(lengths, n_max)
        x = features.masked_fill(~mask.unsqueeze(2), 0.0)
        heads = self.n_heads
        q = self.query(x).view(batch, n_max, heads, self.d_key).transpose(1, 2)  # B × H × N × dk
        k = self.key(x).view(batch, n_max, heads, self.d_key).transpose(1, 2)
        scores = (q @ k.transpose(2, 3)).float() / math.sqrt(self.d_key)  # B × H × N(query) × N(key)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = torch.softmax(scores, dim=3)
        n = lengths.to(attn.dtype)
        received = (attn * mask[:, None, :, None]).sum(2) / n[:, None, None]  # B × H × N
        coef = (received + mask[:, None, :] / n[:, None, None]) / 2  # B × H × N, sums to 1 per head
        xs = x.view(batch, n_max, heads, dim // heads)
        pooled = torch.einsum("bhn,bnhc->bhc", coef.to(xs.dtype), xs).reshape(batch, dim)
        return pooled, coef.mean(1).to(features.dtype)


# ---------------------------------------------------------------------------------------------
# Size augmentation


def host_rand(*shape: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``torch.rand`` drawn on the CPU (from ``generator``, else torch's CPU RNG), then moved to
    ``device``. Augmentations draw this way so that a run makes the same draws on any device, a
    CPU generator also works for GPU tensors, and a resume only needs the CPU RNG states."""
    return torch.rand(*shape, generator=generator).to(device)


def size_augment(features: torch.Tensor, lengths, mode: str = "region", p: float = 0.2,
                 generator: torch.Generator | None = None):
    """Randomly drop set elements (training only) so the pooling sees many set sizes (SPEC §2).

    Args:
        features: B × N × D padded sets.
        lengths: valid sizes (B).
        mode: "region" drops each element with probability ``p``; "grid" does so for a random 80% of
            the samples, each with its own rate ``p · r``, r ~ U(0.2, 1]; "none" returns the input.
        p: base drop probability.
        generator: optional CPU torch.Generator for reproducibility (see :func:`host_rand`).

    Returns:
        (features, lengths): kept elements moved to the front in their original order, the rest
        zero padding; at least one element of every set is kept.
    """
    lengths = check_set_batch(features, lengths)
    if mode not in ("region", "grid", "none"):
        raise ValueError(f"size_augment mode must be 'region', 'grid' or 'none', got {mode!r}")
    if mode == "none" or p <= 0:
        return features, lengths
    batch, n_max, _ = features.shape
    device = features.device
    if mode == "region":
        rate = torch.full((batch, 1), float(p), device=device)
    elif mode == "grid":
        r = 1.0 - 0.8 * host_rand(batch, 1, generator=generator, device=device)  # U(0.2, 1]
        apply = host_rand(batch, 1, generator=generator, device=device) < 0.8
        rate = torch.where(apply, p * r, torch.zeros_like(r))
    else:
        raise ValueError(f"size_augment mode must be 'region', 'grid' or 'none', got {mode!r}")
    mask = valid_mask(lengths, n_max)
    keep = (host_rand(batch, n_max, generator=generator, device=device) >= rate) & mask
    # Never empty a set: keep one random valid element where everything was dropped.
    empty = keep.sum(1) == 0
    if empty.any():
        pick = (host_rand(batch, generator=generator, device=device) * lengths).long()
        keep[empty, pick[empty]] = True
    new_lengths = keep.sum(1)
    # Stable compaction: kept elements first, in order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    compact = features.gather(1, order.unsqueeze(2).expand(-1, -1, features.shape[2]))
    compact = compact.masked_fill(~valid_mask(new_lengths, n_max).unsqueeze(2), 0.0)
    n_new = int(new_lengths.max())
    return compact[:, :n_new], new_lengths


# ---------------------------------------------------------------------------------------------
# Registry


POOLING_NAMES = ("gpo", "avg", "max", "kmax:K", "gem", "interp", "sincos_mlp", "index_bigru",
                 "fspool", "cls", "attention", "gpo-perdim", "gpo-features", "gpo-transformer")


def build_pooling(name: str, dim: int | None = None, **kwargs) -> nn.Module:
    """Build a pooling layer by name: "gpo", "avg", "max", "kmax:K" (e.g. "kmax:20"), "gem",
    "interp", "sincos_mlp", "index_bigru", "fspool", "cls" (first token), "attention" (one
    self-attention layer), and GPO's variants "gpo-perdim" (one θ per dimension), "gpo-features"
    (θ also sees the sorted values), "gpo-transformer" (transformer generator).

    Args:
        name: the pooling's name.
        dim: feature dimension D (needed by "fspool", "attention", "gpo-perdim", "gpo-features").
        **kwargs: passed to the constructor (e.g. ``d_pe``, ``d_hidden`` for GPO).
    """
    key = name.strip().lower()
    if key == "gpo":
        return GPO(**kwargs)
    variants = {"gpo-perdim": "per_dimension", "gpo-features": "feature_dim"}
    if key in variants or key in ("fspool", "attention"):
        if dim is None:
            raise ValueError(f"pooling {name!r} needs the feature dimension: build_pooling({name!r}, dim)")
        if key in variants:
            return GPO(**{variants[key]: dim}, **kwargs)
        return FSPool(dim, **kwargs) if key == "fspool" else SelfAttentionPool(dim, **kwargs)
    if key == "gpo-transformer":
        return GPO(sequence_model="transformer", **kwargs)
    if key == "cls":
        return ClsPool()
    if key in ("avg", "mean", "average"):
        return AvgPool()
    if key == "max":
        return MaxPool()
    if key.startswith("kmax"):
        _, _, k = key.partition(":")
        if not k.isdigit():
            raise ValueError(f"K-max pooling is written 'kmax:K' with a positive integer K, got {name!r}")
        return KMaxPool(int(k))
    if key == "gem":
        return GeMPool(**kwargs)
    if key == "interp":
        return InterpolatedIndexPool(**kwargs)
    if key == "sincos_mlp":
        return SinCosMLPPool(**kwargs)
    if key == "index_bigru":
        return IndexBiGRUPool(**kwargs)
    raise ValueError(f"unknown pooling {name!r}; choose one of {', '.join(POOLING_NAMES)}")
