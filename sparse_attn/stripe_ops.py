"""``stripe_attention``: validation and dispatch for :class:`StripeSparseMask` (Triton kernel or PyTorch path).

``sparse_attention(q, k, v, mask)`` forwards here when ``mask`` is a :class:`StripeSparseMask`.
"""

import torch

from sparse_attn_kernels.block_sparse.cpu import block_sparse_attn_cpu
from sparse_attn_kernels.reference_stripe import stripe_sparse_fwd_ref

from ._checks import (check_bool, check_mask_fits, check_qkv, check_scale, empty_attention, resolve_backend,
                      use_fused_cpu_path)
from .stripe_mask import StripeSparseMask

# Upper bound, in elements, of one chunk of the [rows, BLOCK_M, NE] scores of the block-column dK/dV.
EXTRA_CHUNK_ELEMS = 1 << 24


def _block_column_dkv(q, k, v, do, lse, delta, mask, causal, scale):
    """dK, dV (float32 ``[B, Hkv, Lk, D]``) of the pairs on the mask's per-query-block columns, in PyTorch.

    The Triton dK/dV kernel of the column part scans every query row of each *global* column; block
    columns are seen by one query block only, so their share of dK/dV is added here: per (batch, query
    head, query block) the scores against its gathered columns, ``p = exp(s - lse)``,
    ``dV += p^T dO`` and ``dK += scale * (p * (dP - delta))^T Q``, scattered with ``index_add_``.
    """
    from sparse_attn_kernels.reference_stripe import _mask_head_div

    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    bm = mask.block_size[0]
    n_b, n_h, n_qb, width = mask.block_columns.shape
    dev = q.device
    dk = torch.zeros((batch * n_kv_heads * kv_len, head_dim), dtype=torch.float32, device=dev)
    dv = torch.zeros_like(dk)
    pad = n_qb * bm - q_len
    qf, dof = (torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).reshape(-1, bm, head_dim) for x in (q, do))
    lsef = torch.nn.functional.pad(lse.float(), (0, pad), value=float("inf")).reshape(-1, bm)  # p = 0 on padding
    deltaf = torch.nn.functional.pad(delta.float(), (0, pad)).reshape(-1, bm)
    kf, vf = k.float().reshape(-1, head_dim), v.float().reshape(-1, head_dim)
    b_of = torch.arange(batch, device=dev).repeat_interleave(n_q_heads * n_qb)  # one row per (b, hq, m)
    h_of = torch.arange(n_q_heads, device=dev).repeat_interleave(n_qb).repeat(batch)
    m_of = torch.arange(n_qb, device=dev).repeat(batch * n_q_heads)
    mrow = (b_of * (n_h if n_b > 1 else 0) + h_of // _mask_head_div(n_h, n_q_heads, n_kv_heads)) * n_qb + m_of
    kv_row = (b_of * n_kv_heads + h_of // (n_q_heads // n_kv_heads)) * kv_len
    cnt = mask.block_column_counts.reshape(-1)[mrow].long()
    cols = mask.block_columns.reshape(-1, width)[mrow].long()  # [R, NE]
    rows = m_of[:, None] * bm + torch.arange(bm, device=dev)  # [R, BM]
    step = max(1, EXTRA_CHUNK_ELEMS // max(1, bm * max(width, head_dim)))
    for a in range(0, cols.shape[0], step):
        r = slice(a, a + step)
        slot = torch.arange(width, device=dev) < cnt[r, None]  # [C, NE]
        ok = slot[:, None, :]  # [C, 1, NE]
        if causal:
            ok = ok & (cols[r, None, :] <= rows[r, :, None] + (kv_len - q_len))
        flat = (kv_row[r, None] + cols[r]).reshape(-1)  # [C * NE]
        kc, vc = (torch.where(slot[..., None], x[flat].view(-1, width, head_dim), 0.0) for x in (kf, vf))
        s = torch.einsum("cmd,cnd->cmn", qf[r], kc) * scale
        p = torch.where(ok, torch.exp(s - lsef[r, :, None]), 0.0)  # [C, BM, NE]
        ds = p * (torch.einsum("cmd,cnd->cmn", dof[r], vc) - deltaf[r, :, None])
        dv.index_add_(0, flat, torch.einsum("cmn,cmd->cnd", p, dof[r]).reshape(-1, head_dim))
        dk.index_add_(0, flat, (torch.einsum("cmn,cmd->cnd", ds, qf[r]) * scale).reshape(-1, head_dim))
    return dk.view(batch, n_kv_heads, kv_len, head_dim), dv.view(batch, n_kv_heads, kv_len, head_dim)


class _BlockColumnStripeFunction(torch.autograd.Function):
    """The Triton stripe forward/backward for a mask with block columns: the forward and dQ kernels read the
    merged column part as is; dK/dV of the block columns come from :func:`_block_column_dkv`."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        from sparse_attn_kernels.stripe_sparse.fwd import stripe_sparse_fwd

        lowered = _lowered(mask)
        bm, bn = mask.block_size
        o, lse = stripe_sparse_fwd(q, k, v, *lowered, bm, bn, causal, scale)
        ctx.mark_non_differentiable(lse)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, o, lse)
            ctx.mask, ctx.args = mask, (causal, scale)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        from sparse_attn_kernels.stripe_sparse.bwd import stripe_sparse_bwd

        q, k, v, o, lse = ctx.saved_tensors
        mask, (causal, scale) = ctx.mask, ctx.args
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = stripe_sparse_bwd(do, q, k, v, o, lse, _lowered(mask), mask.kv_major(), mask.vertical,
                                       mask.vertical_count, *mask.block_size, causal, scale)
        delta = (o.float() * do.float()).sum(-1)
        edk, edv = _block_column_dkv(q, k, v, do, lse, delta, mask, causal, scale)
        return dq, (dk.float() + edk).to(k.dtype), (dv.float() + edv).to(v.dtype), None, None, None


def _lowered(mask):
    return (mask.block_counts, mask.block_indices, mask.block_full, mask.col_counts, mask.col_indices,
            mask.diag_keep, mask.col_keep)

def _check_mask(mask, q, k):
    if not isinstance(mask, StripeSparseMask):
        raise TypeError(f"mask must be a StripeSparseMask, got {type(mask).__name__}.")
    check_mask_fits(mask, q, k)


def stripe_attention(q, k, v, mask, *, causal=False, scale=None, return_lse=False, backend="auto"):
    """Attention over the vertical columns and slash diagonals of ``mask``, exact at token level.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA without repeating K/V).
        mask: :class:`StripeSparseMask` built for ``(Lq, Lk)``; heads 1, Hkv or Hq; batch 1 or B.
        causal: AND the bottom-right causal predicate ``j <= i + (Lk - Lq)`` into the mask.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log; -inf on empty rows).
        backend: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``. Both paths
            are differentiable; the Triton backward is deterministic (no atomics).

    Returns:
        ``o`` ``[B, Hq, Lq, D]`` in q's dtype (rows that see no key are 0), and ``lse`` when asked.

    Example:
        >>> q = k = v = torch.randn(1, 2, 100, 32)
        >>> mask = StripeSparseMask.from_vertical_slash(torch.tensor([[[0]]]), torch.tensor([[[0, 1, 2]]]),
        ...                                             seq_lens=(100, 100), block_size=32)
        >>> stripe_attention(q, k, v, mask, causal=True).shape
        torch.Size([1, 2, 100, 32])
    """
    check_bool(causal, "causal")
    check_bool(return_lse, "return_lse")
    check_qkv(q, k, v, backend)
    _check_mask(mask, q, k)
    backend = resolve_backend(backend, q, mask.block_size)
    scale = check_scale(scale, q)
    if q.shape[0] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        o, lse = empty_attention(q, k, v)
        return (o, lse) if return_lse else o
    lowered = _lowered(mask)
    bm, bn = mask.block_size
    if backend == "triton" and mask.has_block_columns:
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        o, lse = _BlockColumnStripeFunction.apply(q, k, v, mask, bool(causal), float(scale))
    elif backend == "triton":
        from sparse_attn_kernels.stripe_sparse.op import stripe_sparse_attn

        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        bwd_lists = (*mask.kv_major(), mask.vertical, mask.vertical_count) if needs_grad else None
        o, lse = stripe_sparse_attn(q, k, v, lowered, bwd_lists, bm, bn, bool(causal), float(scale))
    elif use_fused_cpu_path(q, k, v, return_lse):
        # the same pairs as a block mask with bits, on the fused CPU path (the stripe reference gathers per
        # row and runs 10-100x slower); causal is folded into the bits
        block = mask.to_block_mask(causal=bool(causal))
        o, lse = block_sparse_attn_cpu(q, k, v, block.counts, block.indices, bm, bn, False, float(scale),
                                       preds=block.token_predicates())
        lse = lse.float()
    else:
        o, lse = stripe_sparse_fwd_ref(q, k, v, *lowered, bm, bn, bool(causal), float(scale))
        lse = lse.float()
    return (o, lse) if return_lse else o

