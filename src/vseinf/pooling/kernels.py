"""The fast paths GPO calls, each with a hand-written backward pass, and their slow twins.

* :func:`rank_weighted_sum` — Σ_k w[b, k] · (k-th largest of each dimension of a padded set): one
  contiguous sort with a scatter backward, or for weights concentrated on the top K ≤ 4 ranks, K
  rounds of "max, knock the winner out". :func:`rank_weighted_sum_reference` is its obvious twin.
* :func:`bigru_over_positions` — GPO's BiGRU over the rank encodings for every set size at once:
  the forward direction is shared by all sizes, and the recurrence runs in one hand-written scan.
  :func:`packed_bigru` (``nn.GRU`` on packed sequences) is the plain version.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .functional import valid_mask

__all__ = ["rank_weighted_sum", "rank_weighted_sum_reference", "bigru_over_positions", "packed_bigru"]


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


def packed_bigru(gru: nn.GRU, inputs: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
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


def bigru_over_positions(gru: nn.GRU, inputs: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
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
