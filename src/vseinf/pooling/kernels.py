"""The fast paths GPO calls, each with a hand-written backward pass, and their slow twins.

* :func:`rank_weighted_sum` — Σ_k w[b, k] · (k-th largest of each dimension of a padded set): on
  the CPU one numpy sort of float64 words that carry each value with its position, and a scatter
  by those positions backward; ``torch.sort`` elsewhere; for weights concentrated on the top K ≤ 4
  ranks, K rounds of "max, knock the winner out". :func:`rank_weighted_sum_reference` is its twin.
* :func:`bigru_over_positions` — GPO's BiGRU over the rank encodings for every set size at once:
  the forward direction is shared by all sizes, and the recurrence runs in one hand-written scan.
  :func:`packed_bigru` (``nn.GRU`` on packed sequences) is the plain version.
* :func:`on_one_thread` — runs a small computation of many tiny kernels (θ's generator) and its
  backward pass on one intra-op thread.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .functional import valid_mask

__all__ = ["rank_weighted_sum", "rank_weighted_sum_reference", "bigru_over_positions", "packed_bigru", "on_one_thread"]


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
        # B × D × N, sortable rows; a copy even when the transpose is a no-op (D = 1): it is written to
        xt = features.detach().transpose(1, 2).clone(memory_format=torch.contiguous_format)
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


_PACKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # exactly representable as float32
_TASK_ELEMENTS = 1 << 18  # elements of the sets one task handles: its buffers stay in the cache
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a pool does not survive fork
_scratch = threading.local()
_SCRATCH_LIMIT = 1 << 26  # bytes: larger buffers are not kept


def _in_tasks(work, batch: int, set_elements: int) -> None:
    """work(lo, hi) for consecutive ranges of sets covering 0..batch-1, on torch's number of threads.

    The tasks use numpy and torch's single-threaded 2-D transpose, which release the GIL, so the
    threads run in parallel without intra-op thread pools (whose barriers cost milliseconds each
    on a busy machine), and each task's buffers stay in the cache from one step to the next.
    """
    global _pool
    if torch.is_inference_mode_enabled():  # thread-local: the workers must write inference tensors too
        caller_work = work

        def work(lo: int, hi: int) -> None:
            with torch.inference_mode():
                caller_work(lo, hi)

    per_task = max(1, _TASK_ELEMENTS // max(1, set_elements))
    ranges = [(lo, min(lo + per_task, batch)) for lo in range(0, batch, per_task)]
    threads = min(torch.get_num_threads(), len(ranges))
    if threads <= 1:
        for lo, hi in ranges:
            work(lo, hi)
        return
    if _pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers < threads:
        _pool = (os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="vseinf-pooling"))
    for task in [_pool[1].submit(work, lo, hi) for lo, hi in ranges]:
        task.result()  # re-raises a task's exception


def _scratch_array(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A buffer of this thread's, reused from call to call: on the CPU a fresh large array costs
    more in page faults than the work done in it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes > _SCRATCH_LIMIT:
        return np.empty(shape, dtype)  # a huge set: not worth holding on to
    buf = getattr(_scratch, name, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(nbytes, np.uint8)
        setattr(_scratch, name, buf)
    return buf[:nbytes].view(dtype).reshape(shape)


class _PackedSortWeightedSum(torch.autograd.Function):
    """Σ_k w[b,k] · sort_desc(x[b, :, d])[k] for CPU tensors of up to 32 bits, sorting with numpy.

    Every (set, dimension) row is sorted as float64 keys: a float32 v at set position n becomes one
    64-bit word, high half the bits of v, low half n. Read as a float64, that word has v's sign and
    a magnitude that orders like |v| and then n (an IEEE float's bits order like its magnitude), so
    sorting the words sorts the values, ties by position, and carries each position along. numpy
    sorts float64 rows with x86-simd-sort's vectorised networks, several times faster than
    torch.sort, which also writes an int64 index array beside the values. Only each set's first n
    (valid) keys are sorted, so padding costs no sorting and can hold anything; a NaN (numpy sorts
    it last) stays among the valid values, as with torch.sort. The value of descending rank k then
    sits at ascending position n-1-k, and the padding, zeroed, keeps positions n..N-1, where the
    weights are gathered from the ranks past n (all zero).

    The backward pass sends g[b,d] · w[b, rank] to each element's position (a scatter by the
    positions the sort carried, no second sort) and contracts the sorted values with g for w's
    gradient. Sets are transposed, keyed, sorted and scattered a few at a time in worker threads.
    """

    @staticmethod
    def forward(ctx, features, weights, lengths):
        x = features.detach().to(torch.float32).contiguous()  # bf16/fp16 (autocast) convert exactly
        batch, n_max, dim = x.shape
        values = x.new_empty(batch, dim, n_max)  # the sets transposed, then their sorted values
        position_type = np.uint8 if n_max <= 1 << 8 else np.int16 if n_max <= 1 << 15 else np.int32
        positions = np.empty((batch, dim, n_max), position_type) if ctx.needs_input_grad[0] else None
        values_np, sizes = values.numpy(), lengths.tolist()

        def sort_sets(lo: int, hi: int) -> None:
            for b in range(lo, hi):
                values[b].copy_(x[b].t())  # D × N
            v = values_np[lo:hi]
            keys = _scratch_array("keys", (hi - lo, dim, n_max, 2), np.int32)
            keys[..., 0] = np.arange(n_max, dtype=np.int32)
            keys[..., 1] = v.view(np.int32)
            rows = keys.view(np.float64).reshape(hi - lo, dim, n_max)
            for b in range(lo, hi):  # each set's valid prefix only: the padding stays where it is
                rows[b - lo, :, :sizes[b]].sort(axis=1)
            v.view(np.int32)[...] = keys[..., 1]
            for b in range(lo, hi):
                v[b - lo, :, sizes[b]:] = 0.0  # the padding (it may hold anything, NaN included)
            if positions is not None:
                positions[lo:hi] = keys[..., 0]

        _in_tasks(sort_sets, batch, n_max * dim)
        # Ascending position j of a set of size n holds descending rank n-1-j; (n-1-j) mod N sends the
        # padding positions j >= n to ranks >= n, whose weight is 0. The map is its own inverse.
        to_rank = (lengths.view(-1, 1) - 1 - torch.arange(n_max, device=lengths.device)).remainder(n_max)
        w_asc = weights.detach().float().gather(1, to_rank).contiguous()  # B × N, weight of each position
        ctx.positions = positions  # numpy: not a tensor autograd could save
        ctx.dtypes = features.dtype, weights.dtype
        ctx.save_for_backward(values, w_asc, to_rank)
        return torch.bmm(values, w_asc.unsqueeze(2)).squeeze(2).to(features.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        values, w_asc, to_rank = ctx.saved_tensors
        grad_features = grad_weights = None
        if ctx.needs_input_grad[0]:
            batch, dim, n_max = values.shape
            grad_features = values.new_empty(batch, n_max, dim)
            g_np, w_np, positions = grad_out.detach().float().contiguous().numpy(), w_asc.numpy(), ctx.positions
            row_start = np.arange(0, dim * n_max, n_max, dtype=np.int64).reshape(dim, 1)

            def scatter_sets(lo: int, hi: int) -> None:
                index = _scratch_array("index", (dim, n_max), np.int64)
                per_rank = _scratch_array("per_rank", (dim, n_max), np.float32)
                block = _scratch_array("block", (dim, n_max), np.float32)
                for b in range(lo, hi):
                    np.add(positions[b], row_start, out=index)  # flat index in the D × N block
                    np.multiply(g_np[b][:, None], w_np[b], out=per_rank)
                    block.reshape(-1)[index.reshape(-1)] = per_rank.reshape(-1)
                    grad_features[b].copy_(torch.from_numpy(block).t())

            _in_tasks(scatter_sets, batch, n_max * dim)
            grad_features = grad_features.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_asc = torch.bmm(grad_out.float().unsqueeze(1), values).squeeze(1)
            grad_weights = grad_asc.gather(1, to_rank).to(ctx.dtypes[1])
        return grad_features, grad_weights, None


def rank_weighted_sum(features: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor,
                      tail_eps: float = 1e-6) -> torch.Tensor:
    """Σ_k weights[b, k] · (k-th largest of features[b, :lengths[b], d]) for every b, d.

    ``weights`` is B × N, zero at padded positions, each row summing to 1. When all but ``tail_eps`` of
    every row's mass sits on the first K positions (a trained GPO on region features is close to max
    pooling), only the top K values are selected instead of fully sorting: the neglected part of the
    sum is at most ``tail_eps`` × max|feature|. Otherwise every (set, dimension) row is sorted once
    (floats of up to 32 bits on the CPU: :class:`_PackedSortWeightedSum`; else ``torch.sort``) and
    contracted with the weights in one batched matrix product; the backward pass reuses the sort's
    permutation.
    """
    batch, n_max, dim = features.shape
    mask = valid_mask(lengths, n_max)
    k = n_max
    if tail_eps > 0 and n_max > 1:
        with torch.no_grad():
            tail = 1.0 - weights.detach().float().cumsum(1)  # mass beyond positions 0..k
            k = int(min(int(((tail > tail_eps).sum(1) + 1).max()), n_max))
    if k > n_max // 4:
        if features.device.type == "cpu" and features.dtype in _PACKED_DTYPES:
            return _PackedSortWeightedSum.apply(features, weights, lengths)
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


@contextmanager
def _one_thread(device: torch.device):
    """Run a loop of tiny CPU kernels on one intra-op thread. Threads cannot speed up a product of a
    few hundred numbers, yet MKL still hands each one to a second thread, and on a busy machine the
    wait for that thread costs milliseconds a step (measured: 50x the single-threaded scan).
    ``torch.set_num_threads`` is process-wide for threads that start meanwhile: keep the block short."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _OnOneThread(torch.autograd.Function):
    """fn() built and differentiated under :func:`_one_thread`. ``params`` are the leaves fn's graph
    reaches; the engine routes the gradients this returns for them as if fn had run directly."""

    @staticmethod
    def forward(ctx, fn, *params):
        with torch.enable_grad(), _one_thread(params[0].device):
            out = fn()
        ctx.graph, ctx.params = out, params
        return out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        wanted = ctx.needs_input_grad[1:]
        params = [p for p, need in zip(ctx.params, wanted) if need]
        if not ctx.graph.requires_grad:  # fn did not use the parameters
            return (None,) * (1 + len(wanted))
        with _one_thread(grad.device):
            grads = iter(torch.autograd.grad(ctx.graph, params, grad, retain_graph=True, allow_unused=True))
        return (None, *[next(grads) if need else None for need in wanted])


def on_one_thread(fn, params) -> torch.Tensor:
    """fn() — a small computation of many tiny kernels, such as GPO's θ generator — with its forward
    and its backward pass on one intra-op thread (see :func:`_one_thread`).

    Args:
        fn: computes a tensor from ``params`` (and constants).
        params: the tensors fn differentiates with respect to (a module's parameters).
    """
    params = tuple(params)
    if not params or params[0].device.type != "cpu":
        return fn()
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        with _one_thread(params[0].device):
            return fn()
    return _OnOneThread.apply(fn, *params)


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
    size) run in one loop. The loops are what costs here (T steps of kernels on a few hundred
    numbers each), so they hold as few kernels as possible: six a step forward, writing straight
    into the buffers the backward pass reads; two a step backward, because everything that does not
    depend on the incoming gradient is computed for all steps at once before the loop.

    Inputs: gi (R × T × 3H, input projections incl. bias, gate order r, z, n as in ``nn.GRU``),
    w_hh (S × 3H × H), b_hh (S × 3H), row_weight (R, long). Output: hidden states R × T × H (h0 = 0).
    """

    @staticmethod
    def forward(ctx, gi, w_hh, b_hh, row_weight):
        with _one_thread(gi.device):
            return _GRUScan._forward(ctx, gi, w_hh, b_hh, row_weight)

    @staticmethod
    def backward(ctx, grad_hs):
        with _one_thread(grad_hs.device):
            return _GRUScan._backward(ctx, grad_hs)

    @staticmethod
    def _forward(ctx, gi, w_hh, b_hh, row_weight):
        rows, steps, three_h = gi.shape
        hid = three_h // 3
        w_rows = w_hh[row_weight]  # R × 3H × H
        w_rows_t = w_rows.transpose(1, 2)  # R × H × 3H
        b_rows = b_hh[row_weight].unsqueeze(1)  # R × 1 × 3H
        gi_steps = gi.transpose(0, 1)  # T × R × 3H
        gi_rz, gi_n = gi_steps[..., :2 * hid].contiguous(), gi_steps[..., 2 * hid:].contiguous()
        hs = gi.new_zeros(steps + 1, rows, hid)  # hs[t + 1] = h_t, hs[0] = h0 = 0
        gh = gi.new_empty(steps, rows, 1, three_h)  # W_hh h_{t-1} + b_hh
        rz = gi.new_empty(steps, rows, 2 * hid)  # reset and update gates
        n = gi.new_empty(steps, rows, hid)  # candidate state
        # Per-step views made once: building them in the loop costs as much as the kernels.
        h, h_col, gh_t = hs.unbind(0), hs.unsqueeze(2).unbind(0), gh.unbind(0)
        gh_rz, gh_n = gh[:, :, 0, :2 * hid].unbind(0), gh[:, :, 0, 2 * hid:].unbind(0)
        rz_t, r_t, z_t, n_t = rz.unbind(0), rz[..., :hid].unbind(0), rz[..., hid:].unbind(0), n.unbind(0)
        gi_rz_t, gi_n_t = gi_rz.unbind(0), gi_n.unbind(0)
        for t in range(steps):
            torch.baddbmm(b_rows, h_col[t], w_rows_t, out=gh_t[t])
            torch.add(gi_rz_t[t], gh_rz[t], out=rz_t[t]).sigmoid_()
            torch.addcmul(gi_n_t[t], r_t[t], gh_n[t], out=n_t[t]).tanh_()
            torch.lerp(n_t[t], h[t], z_t[t], out=h[t + 1])  # h_t = (1 - z) n + z h_{t-1}
        gates = torch.cat([rz, n], dim=2)  # T × R × 3H: r, z, n
        ctx.save_for_backward(w_rows, hs, gates, gh, row_weight)
        ctx.n_sets = w_hh.shape[0]
        return hs[1:].transpose(0, 1)

    @staticmethod
    def _backward(ctx, grad_hs):
        w_rows, hs, gates, gh, row_weight = ctx.saved_tensors
        steps, rows, three_h = gates.shape
        hid = three_h // 3
        grad_steps = grad_hs.transpose(0, 1).contiguous()  # T × R × H
        r, z, n = gates.split(hid, dim=2)
        h_prev = hs[:-1]
        # With c_t = dL/dh_t, the gate pre-activations get c_t times these (all steps at once):
        d_n = (1 - z) * (1 - n * n)
        d_z = (h_prev - n) * z * (1 - z)
        d_r = d_n * gh[:, :, 0, 2 * hid:] * r * (1 - r)
        # u_t = c_t * [d_r, d_z, d_n r, z] holds dL/d(W_hh h_{t-1}) and the direct path z, so one
        # batched product with [W_hh; I] gives c_{t-1} = grad_{t-1} + u_t [W_hh; I].
        factors = torch.stack([d_r, d_z, d_n * r, z], dim=2)  # T × R × 4 × H
        eye = torch.eye(hid, dtype=w_rows.dtype, device=w_rows.device).expand(rows, hid, hid)
        w_ext = torch.cat([w_rows, eye], dim=1)  # R × 4H × H
        c = torch.empty_like(grad_steps)
        c[steps - 1] = grad_steps[steps - 1]
        u = factors.new_empty(rows, 4, hid)
        u_row = u.view(rows, 1, 4 * hid)
        c_t, g_t = c.unsqueeze(2).unbind(0), grad_steps.unsqueeze(2).unbind(0)  # R × 1 × H each
        f_t = factors.unbind(0)
        for t in range(steps - 1, 0, -1):
            torch.mul(c_t[t], f_t[t], out=u)
            torch.baddbmm(g_t[t - 1], u_row, w_ext, out=c_t[t - 1])
        d_gh = (c.unsqueeze(2) * factors[:, :, :3]).reshape(steps, rows, three_h)
        d_gi = torch.cat([d_gh[:, :, :2 * hid], c * d_n], dim=2)
        d_w_rows = torch.einsum("trg,trh->rgh", d_gh, h_prev)
        d_w = d_w_rows.new_zeros(ctx.n_sets, *d_w_rows.shape[1:]).index_add_(0, row_weight, d_w_rows)
        d_b = d_gh.new_zeros(ctx.n_sets, three_h).index_add_(0, row_weight, d_gh.sum(0))
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
