"""Triton split-K decode kernel over the selected pages of a KV cache, and its launcher.

One program handles one (batch row, kv head, row tile, split). Its tile packs the query rows of
every query head of the GQA group (row ``r`` = head ``r // Lq`` of the group, query ``r % Lq``), so a
K/V page is read once per group. The selected pages of a (batch row, kv head) are cut into
``S`` contiguous ranges of the page list, one per split; each split runs an online softmax over its
pages and writes a normalized partial output and its LSE; :func:`~.merge.merge_splits` combines them
(flash-decoding). Lengths, list widths and the split count are runtime values: a new cache length
never recompiles the kernel.

Caches: contiguous ``[B, Hkv, Lmax, D]``, or paged ``[num_pages, page_size, Hkv, D]`` with
``block_table [B, max_pages]`` (the ``flash_attn_with_kvcache`` layout). With ``page_size=1`` (contiguous
caches) the list holds key positions (a token-granular selection): each step gathers a tile of them. Keys
past ``cache_seqlens`` and pages outside the list are never read; with ``causal``, query ``i`` of ``Lq`` sees key
``j <= seqlen - Lq + i`` (bottom-right).
"""

import torch
import triton
import triton.language as tl

from .._common.config import (autotune_configs, check_fits, dot_precision, inner_tile, launch, pow2_at_least,
                              pruner)
from .._common.attn_jit import drop_nonfinite, finish_rows, online_update, split_program
from .merge import merge_splits

LOG2E = 1.4426950408889634


@triton.jit
def _attend_keys(q, k, v, tok, tok_ok, row_ok, last_key, acc, l_i, m_i, bad, qk_scale,
                 CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys ``k, v [TILE, D]`` at logical positions ``tok [TILE]`` (``tok_ok``:
    in the list and below the row's length)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE] (log2 domain)
    keep = row_ok[:, None] & tok_ok[None, :]  # [BLOCK_M, TILE]
    if CAUSAL:
        keep = keep & (tok[None, :] <= last_key[:, None])
    qk = tl.where(keep, qk, float("-inf"))
    v, bad = drop_nonfinite(v, keep, bad)  # a key a row excludes never reaches its output
    acc, l_i, m_i = online_update(acc, l_i, m_i, qk, v, DOT_PRECISION)  # [BLOCK_M, D]
    return acc, l_i, m_i, bad


@triton.jit(do_not_specialize=["n_kv_heads", "q_len", "n_rows", "n_splits"])
def _decode_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seqlens_ptr, counts_ptr, pages_ptr, table_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_os, stride_or, stride_lb, stride_lh, stride_ls,
    stride_cb, stride_ch, stride_pb, stride_ph, stride_tb,
    n_kv_heads, q_len, n_rows, n_splits, qk_scale,
    GROUP: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # 1-D grid: split fastest, then row tile, then (batch, kv head)
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    inner, _, b, h_kv = split_program(tl.program_id(0), n_splits * n_tiles, n_kv_heads)
    split = inner % n_splits
    tile = inner // n_splits

    offs_r = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] packed (group head, query) rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    offs_t = tl.arange(0, TILE)  # [TILE]
    row_ok = offs_r < n_rows
    d_ok = offs_d < HEAD_DIM
    h_q = h_kv * GROUP + offs_r // q_len  # [BLOCK_M] query head of each row
    i_q = offs_r % q_len  # [BLOCK_M] query position of each row
    q_ptrs = q_ptr + b * stride_qb + h_q[:, None] * stride_qh + i_q[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, D]
    seqlen = tl.load(seqlens_ptr + b)
    last_key = seqlen - q_len + i_q  # [BLOCK_M] bottom-right causal: the last key row r sees

    # -- this split's share of the list (TOKENS: whole tiles of TILE entries) ----
    count = tl.load(counts_ptr + b * stride_cb + h_kv * stride_ch)
    per = tl.cdiv(count, n_splits)
    if TOKENS:
        per = tl.cdiv(per, TILE) * TILE
    lo = split * per
    hi = tl.minimum(lo + per, count)
    page_row = pages_ptr + b * stride_pb + h_kv * stride_ph

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)  # rows that kept a non-finite value
    if TOKENS:  # the list holds key positions of a contiguous cache: TILE of them gathered per step
        k_row = k_ptr + b * stride_kb + h_kv * stride_kh
        v_row = v_ptr + b * stride_vb + h_kv * stride_vh
        for start in range(lo, hi, TILE):
            idx = start + offs_t  # [TILE] list entries
            in_list = idx < hi
            tok = tl.load(page_row + idx, mask=in_list, other=0).to(tl.int64)  # [TILE] key positions
            tok_ok = in_list & (tok < seqlen)
            kv_mask = tok_ok[:, None] & d_ok[None, :]
            k = tl.load(k_row + tok[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)  # [TILE, D]
            v = tl.load(v_row + tok[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)  # [TILE, D]
            acc, l_i, m_i, bad = _attend_keys(q, k, v, tok, tok_ok, row_ok, last_key, acc, l_i, m_i, bad, qk_scale,
                                              CAUSAL, DOT_PRECISION)
    else:
        # one step per TILE keys of a page (a page of any size in bounded shared memory; a flat loop, so the loads
        # of the next step are pipelined and no unrolled sub-tiles hold registers)
        for it in range(lo * (PAGE // TILE), hi * (PAGE // TILE)):
            page = tl.load(page_row + it // (PAGE // TILE)).to(tl.int64)
            offs_p = (it % (PAGE // TILE)) * TILE + offs_t  # [TILE] key offsets inside the page
            if PAGED:
                phys = tl.load(table_ptr + b * stride_tb + page).to(tl.int64)
                k_page = k_ptr + phys * stride_kb + h_kv * stride_kh  # first key of the page
                v_page = v_ptr + phys * stride_vb + h_kv * stride_vh
            else:
                k_page = k_ptr + b * stride_kb + h_kv * stride_kh + page * PAGE * stride_kn
                v_page = v_ptr + b * stride_vb + h_kv * stride_vh + page * PAGE * stride_vn
            tok = page * PAGE + offs_p  # [TILE] logical key positions
            tok_ok = tok < seqlen
            kv_mask = tok_ok[:, None] & d_ok[None, :]
            k = tl.load(k_page + offs_p[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)  # [TILE, D]
            v = tl.load(v_page + offs_p[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)  # [TILE, D]
            acc, l_i, m_i, bad = _attend_keys(q, k, v, tok, tok_ok, row_ok, last_key, acc, l_i, m_i, bad, qk_scale,
                                              CAUSAL, DOT_PRECISION)

    # -- epilogue: a split that saw no key gives o = 0, lse = -inf; a NaN row keeps NaN ----
    o, lse = finish_rows(acc, l_i, m_i, bad)  # [BLOCK_M, D], [BLOCK_M]
    o_ptrs = o_ptr + b * stride_ob + h_kv * stride_oh + split * stride_os + offs_r[:, None] * stride_or + offs_d[None, :]
    tl.store(o_ptrs, o, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * stride_lb + h_kv * stride_lh + split * stride_ls + offs_r, lse, mask=row_ok)


_autotuned_kernel = triton.autotune(
    configs=autotune_configs("decode"), key=["GROUP", "PAGED", "CAUSAL", "PAGE", "TILE", "TOKENS", "BLOCK_M",
                                            "HEAD_DIM_PAD", "DOT_PRECISION"],
    prune_configs_by=pruner("decode", block_n_arg="PAGE"),
)(_decode_fwd_kernel)


def row_tile(n_rows):
    """``BLOCK_M`` for ``n_rows = GROUP * Lq`` packed rows: a power of two in 16..64."""
    return min(64, pow2_at_least(n_rows, 16))


def page_tile(page_size, head_dim_pad, dtype):
    """Keys per step inside a page (:func:`~.._common.config.inner_tile`: up to 64, 32 for fp32 with head dims
    padded to 256), so that a page of any size keeps the K/V tiles within the shared memory of an H100/H200."""
    return inner_tile(page_size, head_dim_pad, dtype)


def default_splits(width, batch, n_kv_heads, n_rows, device):
    """Splits per (batch row, kv head) for a list of up to ``width`` pages: enough programs to fill the
    device, at least 4 pages per split."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: a few splits, so the merge is always exercised
    programs = batch * n_kv_heads * -(-max(1, n_rows) // row_tile(max(1, n_rows)))
    return max(1, min(-(-target // max(1, programs)), max(1, width // 4)))


def decode_fwd(q, k_cache, v_cache, seqlens, counts, pages, block_table, causal, scale, page_size, n_splits=None):
    """Launch the split-K decode kernel and merge its splits.

    Args:
        q: ``[B, Hq, Lq, D]`` with unit last stride.
        k_cache, v_cache: contiguous ``[B, Hkv, Lmax, D]``, or paged ``[num_pages, page_size, Hkv, D]``
            (then ``block_table`` is int32 ``[B, max_pages]``); unit last stride.
        seqlens: int32 ``[B]`` valid keys per row (the queries are the last ``Lq`` of them).
        counts: int32 ``[B, Hkv]`` (strides may be 0) selected pages per (row, kv head).
        pages: int32 ``[B, Hkv, W]`` (strides may be 0) logical page indices; the first ``counts`` are used.
        causal: bottom-right causal masking for ``Lq > 1``.
        scale: softmax scale.
        page_size: tokens per page (a power of two >= 16), or 1: ``pages`` then lists key positions of a
            contiguous cache (a token-granular selection), gathered a tile at a time.
        n_splits: splits per (row, kv head); None chooses from the device and the list width.

    Returns:
        ``(o, lse)``: o ``[B, Hq, Lq, D]`` in q's dtype, lse float32 ``[B, Hq, Lq]`` (natural log).
    """
    batch, n_q_heads, q_len, head_dim = q.shape
    paged = block_table is not None
    n_kv_heads = k_cache.shape[2] if paged else k_cache.shape[1]
    group = n_q_heads // n_kv_heads
    n_rows = group * q_len
    if q.numel() == 0:
        return torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    block_m = row_tile(n_rows)
    n_tiles = -(-n_rows // block_m)
    width = pages.shape[-1]
    splits = n_splits or default_splits(width, batch, n_kv_heads, n_rows, q.device)
    # partial results, poisoned so that an element no program writes shows up as NaN
    o_part = torch.full((batch, n_kv_heads, splits, n_rows, head_dim), float("nan"), dtype=torch.float32,
                        device=q.device)
    lse_part = torch.full((batch, n_kv_heads, splits, n_rows), float("nan"), dtype=torch.float32, device=q.device)
    if paged:  # [pages, page_size, Hkv, D]: (page, head, token) strides
        ks = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))
        vs = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1))
        table = block_table
    else:
        ks, vs = k_cache.stride()[:3], v_cache.stride()[:3]
        table = seqlens  # unused
    head_dim_pad = pow2_at_least(head_dim, 16)
    tokens = page_size == 1
    if tokens and paged:
        raise ValueError("page_size=1 (token lists) needs a contiguous cache, got a block_table.")
    tile = page_tile(64 if tokens else page_size, head_dim_pad, q.dtype)
    block = tile if tokens else page_size  # the PAGE of the kernel: one tile of listed keys per step
    check_fits("decode", q, block_m, block, head_dim_pad)
    grid = (batch * n_kv_heads * n_tiles * splits,)
    args = (
        q, k_cache, v_cache, o_part, lse_part, seqlens, counts, pages, table,
        *q.stride()[:3], *ks, *vs, *o_part.stride()[:4], *lse_part.stride()[:3],
        counts.stride(0), counts.stride(1), pages.stride(0), pages.stride(1), table.stride(0) if paged else 0,
        n_kv_heads, q_len, n_rows, splits, scale * LOG2E,
    )
    meta = dict(GROUP=group, PAGED=paged, CAUSAL=bool(causal) and q_len > 1, PAGE=block, TILE=tile, TOKENS=tokens,
                BLOCK_M=block_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, DOT_PRECISION=dot_precision(q.dtype))
    launch(_autotuned_kernel, _decode_fwd_kernel, "decode", grid, args, meta, q.dtype, block_m, block)
    o, lse = merge_splits(o_part, lse_part)  # [B, Hkv, R, D], [B, Hkv, R]
    o = o.view(batch, n_kv_heads, group, q_len, head_dim).reshape(batch, n_q_heads, q_len, head_dim)
    return o.to(q.dtype), lse.view(batch, n_q_heads, q_len)
