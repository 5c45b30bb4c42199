"""Triton backward kernels for block-sparse attention and their launcher.

Three kernels, FlashAttention-2 style, all recomputing P from the forward's LSE:

1. ``_bwd_preprocess_kernel``: ``delta = rowsum(dO * O) - dLSE`` per query row.
2. ``_block_sparse_bwd_dkdv_kernel``: one program per (batch, kv head, key block). It walks
   the key-major (transposed) lists of the G query heads that share the kv head and
   accumulates dK and dV for its key block in registers. Every (key block, kv head) is
   owned by exactly one program, so dK/dV need no atomics and K/V are never repeated.
3. ``_block_sparse_bwd_dq_kernel``: one program per (batch, query head, query block),
   walking the query-major lists like the forward.

No kernel uses atomics and every reduction runs in a fixed order, so the backward is
deterministic (bitwise repeatable) by construction. Rows that saw no key (LSE = -inf)
get P = 0 and therefore zero gradients. In-tile masking runs only on tiles that cross
the causal diagonal or hold the ragged tail of the keys; the query tail needs no mask
because its rows load ``lse = +inf`` (so P = 0) and ``dO = 0``. With ``causal``, the
list entries that lie wholly on the invisible side of the diagonal (a suffix of a sorted
key-block list, a prefix of a sorted query-block list) are skipped before the loop.
Loads sit at loop top level, as in the forward, so Triton can pipeline them.
"""

import torch
import triton
import triton.language as tl

from .._common.config import inner_tile, dot_precision, fwd_configs, pow2_at_least
from .fwd import _visible_prefix

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["q_len"])
def _bwd_preprocess_kernel(
    o_ptr, do_ptr, dlse_ptr, delta_ptr,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    n_heads, q_len, n_q_blocks,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % n_q_blocks
    pid_bh = pid // n_q_blocks
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    io_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_M, D]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :], mask=io_mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows * stride_dom + offs_d[None, :],
                 mask=io_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    row_ptrs = pid_bh.to(tl.int64) * q_len + offs_m
    if HAS_DLSE:
        # d lse / d s = P, so a gradient on lse folds into delta: dS = P * (dP - (delta - dlse))
        delta -= tl.load(dlse_ptr + row_ptrs, mask=offs_m < q_len, other=0.0)
    tl.store(delta_ptr + row_ptrs, delta, mask=offs_m < q_len)


@triton.jit
def _load_row_stats(lse_ptr, delta_ptr, offs_m, q_len):
    """lse in the log2 domain with -inf (row saw no key) and the query tail mapped to +inf, so P = 0."""
    in_q = offs_m < q_len
    lse = tl.load(lse_ptr + offs_m, mask=in_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(delta_ptr + offs_m, mask=in_q, other=0.0)
    return lse, delta


@triton.jit
def _hidden_prefix(idx_row, count, first_row, q_len, BLOCK_M: tl.constexpr):
    """Number of leading entries of a sorted query-block list whose rows all lie before ``first_row``."""
    n_hid = count * 0  # int32 scalar tensor, loop-carried
    for c in range(0, count, 128):
        offs = c + tl.arange(0, 128)
        qb = tl.load(idx_row + offs, mask=offs < count, other=0).to(tl.int64)
        last_row = tl.minimum(qb * BLOCK_M + BLOCK_M, q_len) - 1
        n_hid += tl.sum(((offs < count) & (last_row < first_row)).to(tl.int32), 0)
    return n_hid


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_k_blocks", "width_t"])
def _block_sparse_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, counts_t_ptr, indices_t_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_cb, stride_ch, stride_ib, stride_ih,
    n_kv_heads, q_len, kv_len, n_k_blocks, width_t, qk_scale, scale,
    GROUP: tl.constexpr, MASK_HEAD_DIV: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1-D grid, key block fastest: programs running together read the Q/dO of one head.
    pid = tl.program_id(0)
    pid_n = pid % n_k_blocks
    pid_bh = pid // n_k_blocks
    b = (pid_bh // n_kv_heads).to(tl.int64)
    h_kv = (pid_bh % n_kv_heads).to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    offs_t = tl.arange(0, TILE_M)  # [TILE_M]
    rows_n = offs_n[:, None].to(tl.int64)
    kv_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_N, D]
    k = tl.load(k_ptr + b * stride_kb + h_kv * stride_kh + rows_n * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [BLOCK_N, D]
    v = tl.load(v_ptr + b * stride_vb + h_kv * stride_vh + rows_n * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [BLOCK_N, D]
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)

    # bottom-right causal alignment: query i sees key j iff j <= i + (kv_len - q_len)
    causal_shift = kv_len - q_len
    key_tail = start_n + BLOCK_N > kv_len
    col = pid_n.to(tl.int64)
    for g in range(0, GROUP):
        h = h_kv * GROUP + g  # query head
        h_mask = h // MASK_HEAD_DIV
        count = tl.load(counts_t_ptr + b * stride_cb + h_mask * stride_ch + col)
        idx_row = indices_t_ptr + b * stride_ib + h_mask * stride_ih + col * width_t
        first = count * 0
        if IS_CAUSAL:
            # sorted lists: the query blocks that lie entirely before the diagonal form a prefix; skip it
            first = _hidden_prefix(idx_row, count, start_n - causal_shift, q_len, BLOCK_M)
        q_base = q_ptr + b * stride_qb + h * stride_qh + offs_d[None, :]
        do_base = do_ptr + b * stride_dob + h * stride_doh + offs_d[None, :]
        row_base = (b * (n_kv_heads * GROUP) + h) * q_len  # lse / delta are [B, Hq, Lq] contiguous
        for it in range(first, count):
            qb = tl.load(idx_row + it).to(tl.int64)
            for sub in tl.static_range(BLOCK_M // TILE_M):
                start_m = qb * BLOCK_M + sub * TILE_M
                offs_m = start_m + offs_t  # [TILE_M]
                io_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)  # [TILE_M, D]
                q = tl.load(q_base + offs_m[:, None] * stride_qm, mask=io_mask, other=0.0)  # [TILE_M, D]
                do = tl.load(do_base + offs_m[:, None] * stride_dom, mask=io_mask, other=0.0)  # [TILE_M, D]
                lse, delta = _load_row_stats(lse_ptr + row_base, delta_ptr + row_base, offs_m, q_len)  # [TILE_M]
                # -- recompute P^T (log2 domain) ----
                qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, TILE_M]
                p_t = tl.math.exp2(qk_t - lse[None, :])  # [BLOCK_N, TILE_M]
                # -- mask only the ragged key tail and tiles that cross the causal diagonal ----
                needs_mask = key_tail
                if IS_CAUSAL:
                    needs_mask = needs_mask | (start_n + BLOCK_N - 1 > start_m + causal_shift)
                if needs_mask:
                    keep = offs_n[:, None] < kv_len  # [BLOCK_N, 1]
                    if IS_CAUSAL:
                        keep = keep & (offs_n[:, None] <= offs_m[None, :] + causal_shift)  # [BLOCK_N, TILE_M]
                    p_t = tl.where(keep, p_t, 0.0)
                # -- dV += P^T dO ; dS^T = P^T * (dP^T - delta) ; dK += dS^T Q ----
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)  # [BLOCK_N, D]
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, TILE_M]
                ds_t = p_t * (dp_t - delta[None, :])  # [BLOCK_N, TILE_M]
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)  # [BLOCK_N, D]

    # -- epilogue: every key row of the block is written, zeros where no query attended ----
    dk = dk * scale
    tl.store(dk_ptr + b * stride_dkb + h_kv * stride_dkh + rows_n * stride_dkn + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b * stride_dvb + h_kv * stride_dvh + rows_n * stride_dvn + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_q_blocks", "width"])
def _block_sparse_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, counts_ptr, indices_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_cb, stride_ch, stride_ib, stride_ih,
    n_q_heads, q_len, kv_len, n_q_blocks, width, qk_scale, scale,
    GROUP: tl.constexpr, MASK_HEAD_DIV: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1-D grid, query block fastest (as the forward).
    pid = tl.program_id(0)
    pid_m = pid % n_q_blocks
    pid_bh = pid // n_q_blocks
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    h_kv = h // GROUP
    h_mask = h // MASK_HEAD_DIV

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    offs_t = tl.arange(0, TILE_N)  # [TILE_N]
    rows_m = offs_m[:, None].to(tl.int64)
    io_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_M, D]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows_m * stride_qm + offs_d[None, :],
                mask=io_mask, other=0.0)  # [BLOCK_M, D]
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows_m * stride_dom + offs_d[None, :],
                 mask=io_mask, other=0.0)  # [BLOCK_M, D]
    row_base = pid_bh.to(tl.int64) * q_len
    lse, delta = _load_row_stats(lse_ptr + row_base, delta_ptr + row_base, offs_m, q_len)  # [BLOCK_M]
    k_base = k_ptr + b * stride_kb + h_kv * stride_kh + offs_d[None, :]
    v_base = v_ptr + b * stride_vb + h_kv * stride_vh + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    causal_shift = kv_len - q_len
    last_q = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1
    row = pid_m.to(tl.int64)
    count = tl.load(counts_ptr + b * stride_cb + h_mask * stride_ch + row)
    idx_row = indices_ptr + b * stride_ib + h_mask * stride_ih + row * width
    if IS_CAUSAL:
        # sorted lists: the key blocks that lie entirely above the diagonal form a suffix; skip it
        count = _visible_prefix(idx_row, count, last_q + causal_shift, BLOCK_N)
    for it in range(0, count):
        kb = tl.load(idx_row + it).to(tl.int64)
        for sub in tl.static_range(BLOCK_N // TILE_N):
            start_n = kb * BLOCK_N + sub * TILE_N
            offs_n = start_n + offs_t  # [TILE_N]
            kv_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)  # [TILE_N, D]
            k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=kv_mask, other=0.0)  # [TILE_N, D]
            v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=kv_mask, other=0.0)  # [TILE_N, D]
            # -- recompute P (log2 domain) ----
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
            p = tl.math.exp2(qk - lse[:, None])  # [BLOCK_M, TILE_N]
            # -- mask only the ragged key tail and tiles that cross the causal diagonal ----
            needs_mask = start_n + TILE_N > kv_len
            if IS_CAUSAL:
                needs_mask = needs_mask | (start_n + TILE_N - 1 > pid_m * BLOCK_M + causal_shift)
            if needs_mask:
                keep = offs_n[None, :] < kv_len  # [1, TILE_N]
                if IS_CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)  # [BLOCK_M, TILE_N]
                p = tl.where(keep, p, 0.0)
            # -- dS = P * (dO V^T - delta) ; dQ += dS K ----
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, TILE_N]
            ds = p * (dp - delta[:, None])  # [BLOCK_M, TILE_N]
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)  # [BLOCK_M, D]

    dq = dq * scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows_m * stride_dqm + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=io_mask)


_KEY = ["GROUP", "IS_CAUSAL", "BLOCK_M", "BLOCK_N", "HEAD_DIM_PAD", "DOT_PRECISION"]
_autotuned_dkdv = triton.autotune(configs=fwd_configs(), key=_KEY + ["TILE_M"])(_block_sparse_bwd_dkdv_kernel)
_autotuned_dq = triton.autotune(configs=fwd_configs(), key=_KEY + ["TILE_N"])(_block_sparse_bwd_dq_kernel)


def _grad_like(x):
    """An uninitialized gradient buffer with x's strides when x is dense with unit last stride."""
    out = torch.empty_like(x)
    return out if out.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _mask_strides(counts, indices, mask_heads):
    """Strides of the mask lists with broadcast dimensions (size 1) set to 0."""
    return (counts.stride(0) if counts.shape[0] > 1 else 0, counts.stride(1) if mask_heads > 1 else 0,
            indices.stride(0) if indices.shape[0] > 1 else 0, indices.stride(1) if mask_heads > 1 else 0)


def block_sparse_bwd(do, q, k, v, o, lse, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale,
                     dlse=None):
    """Launch the backward kernels.

    Args:
        do: ``[B, Hq, Lq, D]`` gradient of the output, unit last stride (any other strides).
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``, unit last stride.
        o: ``[B, Hq, Lq, D]`` and lse: float32 ``[B, Hq, Lq]`` contiguous, from :func:`block_sparse_fwd`.
        counts, indices: the query-major lists of the forward, ``[Bm, Hm, NQB]`` / ``[Bm, Hm, NQB, W]``.
        counts_t, indices_t: the key-major lists, int32 ``[Bm, Hm, NKB]`` / ``[Bm, Hm, NKB, Wt]``
            (``BlockSparseMask.kv_major()``).
        block_m, block_n, causal, scale: as in the forward.
        dlse: optional float ``[B, Hq, Lq]`` gradient of lse.

    Returns:
        ``(dq, dk, dv)`` with the shapes, dtypes and (for dense inputs) strides of q, k, v.

    Example:
        >>> o, lse = block_sparse_fwd(q, k, v, counts, indices, 64, 64, False, 0.125)
        >>> dq, dk, dv = block_sparse_bwd(torch.randn_like(o), q, k, v, o, lse, counts, indices,
        ...                               *mask.kv_major(), 64, 64, False, 0.125)
    """
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    dq, dk, dv = _grad_like(q), _grad_like(k), _grad_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    n_q_blocks, n_k_blocks = counts.shape[-1], counts_t.shape[-1]
    mask_heads = counts.shape[1]
    group = n_q_heads // n_kv_heads
    mask_head_div = 1 if mask_heads == n_q_heads else (group if mask_heads == n_kv_heads else n_q_heads)
    head_dim_pad = pow2_at_least(head_dim, 16)
    if q.is_cuda and q.dtype == torch.float32 and head_dim_pad >= 256 and max(block_m, block_n) > 64:
        raise ValueError(
            f"the fp32 backward with head dim {head_dim} needs block sizes <= 64 (its tiles exceed the 227 KiB "
            f"of shared memory of an H100/H200 otherwise), got block_size=({block_m}, {block_n}); use 64x64 "
            f"blocks or bf16/fp16.")
    precision = dot_precision(q.dtype)
    lse = lse.contiguous()

    # -- delta = rowsum(dO * O) - dlse ----
    delta = torch.empty((batch, n_q_heads, q_len), dtype=torch.float32, device=q.device)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    pre_m = 64
    n_pre = triton.cdiv(q_len, pre_m)
    _bwd_preprocess_kernel[(n_pre * batch * n_q_heads,)](
        o, do, dlse if dlse is not None else delta, delta,
        o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        n_q_heads, q_len, n_pre,
        HAS_DLSE=dlse is not None, BLOCK_M=pre_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
    )

    common = dict(GROUP=group, MASK_HEAD_DIV=mask_head_div, IS_CAUSAL=bool(causal), BLOCK_M=block_m,
                  BLOCK_N=block_n, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, DOT_PRECISION=precision)
    qk_scale = scale * LOG2E
    _autotuned_dkdv[(n_k_blocks * batch * n_kv_heads,)](
        q, k, v, do, lse, delta, dk, dv, counts_t, indices_t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        *_mask_strides(counts_t, indices_t, mask_heads),
        n_kv_heads, q_len, kv_len, n_k_blocks, indices_t.shape[-1], qk_scale, scale,
        TILE_M=inner_tile(block_m, head_dim_pad, q.dtype), **common,
    )
    _autotuned_dq[(n_q_blocks * batch * n_q_heads,)](
        q, k, v, do, lse, delta, dq, counts, indices,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *_mask_strides(counts, indices, mask_heads),
        n_q_heads, q_len, kv_len, n_q_blocks, indices.shape[-1], qk_scale, scale,
        TILE_N=inner_tile(block_n, head_dim_pad, q.dtype), **common,
    )
    return dq, dk, dv
