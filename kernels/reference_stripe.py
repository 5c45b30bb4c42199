"""Plain PyTorch twin of :func:`stripe_sparse_fwd` (same signature, same outputs).

It is the CPU path of ``stripe_attention`` and the readable statement of what the kernel
computes. Work is chunked over (batch, head, query block) rows: per row it gathers the key tiles
of the block part and the columns of the column part that the row may see (with ``causal``, the
sorted lists are cut at the diagonal), so it never builds more than a bounded chunk of scores.
Rows are sorted by their counts so that a chunk is padded only to its own largest count.
Differentiable through autograd.
"""

import torch

from ._common.softmax import accum_dtype, softmax_rows

# Upper bound, in bytes, on the score chunk and on the gathered K/V chunk.
CHUNK_BYTES = 64 * 1024 * 1024


def _mask_head_div(mask_heads, n_q_heads, n_kv_heads):
    if mask_heads == n_q_heads:
        return 1
    return n_q_heads // n_kv_heads if mask_heads == n_kv_heads else n_q_heads


def stripe_sparse_fwd_ref(q, k, v, block_counts, block_indices, block_full, col_counts, col_indices,
                          diag_keep, col_keep, block_m, block_n, causal, scale, chunk_bytes=CHUNK_BYTES):
    """Reference of :func:`stripe_sparse_fwd` (same arguments, same ``(o, lse)``).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        block_counts, block_indices, block_full: the block part ``[Bm, Hm, NQB(, W)]`` (``block_full``
            is only a speed hint for the kernel and is not needed here).
        col_counts, col_indices: the column part ``[Bm, Hm, NQB(, CW)]``.
        diag_keep: int8 ``[Bm, Hm, Lq + Lk - 1]``; col_keep: int8 ``[Bm, Hm, Lk]``.
        block_m, block_n: block size; causal: bottom-right causal; scale: softmax scale.

    Returns:
        o ``[B, Hq, Lq, D]`` in q's dtype, lse ``[B, Hq, Lq]`` float32 (float64 for float64 inputs).

    Example:
        >>> o, lse = stripe_sparse_fwd_ref(q, k, v, *lowered, 64, 64, False, 0.125)  # doctest: +SKIP
    """
    del block_full
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    mask_batch, mask_heads, n_qb = block_counts.shape
    width, col_width = block_indices.shape[-1], col_indices.shape[-1]
    cdt = lse_dtype = accum_dtype(q.dtype)
    if q.numel() == 0 or kv_len == 0:
        return (q.new_zeros(q.shape), torch.full((batch, n_q_heads, q_len), float("-inf"), dtype=lse_dtype,
                                                 device=q.device))
    dev = q.device
    n_diag = q_len + kv_len - 1

    pad = n_qb * block_m - q_len
    qb = torch.nn.functional.pad(q.to(cdt), (0, 0, 0, pad)).reshape(-1, block_m, head_dim)  # [R, bm, D]
    kf = k.to(cdt).reshape(-1, head_dim)  # [B*Hkv*Lk, D]
    vf = v.to(cdt).reshape(-1, head_dim)

    # one row per (batch, query head, query block)
    b_of = torch.arange(batch, device=dev).repeat_interleave(n_q_heads * n_qb)
    h_of = torch.arange(n_q_heads, device=dev).repeat_interleave(n_qb).repeat(batch)
    m_of = torch.arange(n_qb, device=dev).repeat(batch * n_q_heads)
    mrow = b_of * (mask_heads if mask_batch > 1 else 0) + h_of // _mask_head_div(mask_heads, n_q_heads, n_kv_heads)
    kv_row = (b_of * n_kv_heads + h_of // group) * kv_len  # [R]
    mr = mrow * n_qb + m_of
    bcnt = block_counts.reshape(-1)[mr].long()
    bidx = block_indices.reshape(-1, width)[mr].long()  # [R, W]
    ccnt = col_counts.reshape(-1)[mr].long()
    cidx = col_indices.reshape(-1, col_width)[mr].long()  # [R, CW]

    # With causal, the keys a query block may see end at `limit`; lists are sorted, so the visible
    # entries are a prefix. Rows are processed sorted by their visible counts, in chunks padded only
    # to the chunk's largest count.
    limit = m_of * block_m + block_m - 1 + (kv_len - q_len) if causal else torch.full_like(m_of, kv_len - 1)
    bslot = torch.arange(width, device=dev) < bcnt[:, None]
    cslot = torch.arange(col_width, device=dev) < ccnt[:, None]
    bcnt = (bslot & (bidx * block_n <= limit[:, None])).sum(-1)
    ccnt = (cslot & (cidx <= limit[:, None])).sum(-1)
    n_rows = qb.shape[0]
    order = torch.argsort(bcnt * (col_width + 1) + ccnt)
    cost = ((bcnt * block_n + ccnt)[order] * block_m + 1).tolist()  # score entries per row, ascending

    n_kb = -(-kv_len // block_n)
    pad_k = n_kb * block_n - kv_len
    kblk = torch.nn.functional.pad(k.to(cdt), (0, 0, 0, pad_k)).reshape(-1, block_n, head_dim)  # [B*Hkv*NKB, bn, D]
    vblk = torch.nn.functional.pad(v.to(cdt), (0, 0, 0, pad_k)).reshape(-1, block_n, head_dim)
    kv_blk_row = kv_row // kv_len * n_kb  # [R]
    diag_flat, vert_flat = diag_keep.reshape(-1).bool(), col_keep.reshape(-1).bool()
    tok_n = torch.arange(block_n, device=dev)
    tok_m = torch.arange(block_m, device=dev)
    win_off = torch.arange(block_m + block_n - 1, device=dev) - (block_n - 1) + (kv_len - 1)
    budget = max(1, chunk_bytes // (8 * (3 + 2 * head_dim // block_m)))

    outs, lses = [], []
    r0 = 0
    while r0 < n_rows:
        r1 = r0 + 1  # the largest r1 with (r1 - r0) * cost[r1 - 1] <= budget (cost ascending)
        lo, hi = r0 + 1, n_rows
        while lo <= hi:
            mid = (lo + hi) // 2
            if (mid - r0) * cost[mid - 1] <= budget:
                r1, lo = mid, mid + 1
            else:
                hi = mid - 1
        rows = order[r0:r1]
        n_c = r1 - r0
        w_c, c_c = int(bcnt[rows].max()), int(ccnt[rows].max())
        bi = bidx[rows, :w_c]  # [C, Wc]
        b_ok = torch.arange(w_c, device=dev) < bcnt[rows, None]
        bi = torch.where(b_ok, bi, 0)
        ci = cidx[rows, :c_c]  # [C, Cc]
        c_ok = torch.arange(c_c, device=dev) < ccnt[rows, None]
        ci = torch.where(c_ok, ci, 0)
        kg = torch.cat([kblk[kv_blk_row[rows, None] + bi].reshape(n_c, w_c * block_n, head_dim),
                        kf[kv_row[rows, None] + ci]], 1)  # [C, N, D]
        vg = torch.cat([vblk[kv_blk_row[rows, None] + bi].reshape(n_c, w_c * block_n, head_dim),
                        vf[kv_row[rows, None] + ci]], 1)
        # a key the mask excludes never reaches an output: zero non-finite keys, flag the rows that see one
        bad = ~(torch.isfinite(kg).all(-1) & torch.isfinite(vg).all(-1))  # [C, N]
        kg, vg = kg.masked_fill(bad[..., None], 0.0), vg.masked_fill(bad[..., None], 0.0)
        s = torch.bmm(qb[rows], kg.transpose(1, 2)) * scale  # [C, bm, N]
        # block part: tile (m, kb) keeps (r, t) iff diag[m*bm - kb*bn + r - t] or the key is a column;
        # the [bm, bn] diagonal pattern is a Toeplitz view of a (bm + bn - 1)-window of diag_keep
        d0 = m_of[rows, None] * block_m - bi * block_n  # [C, Wc]
        win_idx = torch.clamp(d0[..., None] + win_off, 0, n_diag - 1)  # [C, Wc, bm + bn - 1]
        win = diag_flat[mrow[rows, None, None] * n_diag + win_idx]
        on_slash = win.unfold(-1, block_n, 1).flip(-1)  # [C, Wc, bm, bn]
        key = bi[..., None] * block_n + tok_n  # [C, Wc, bn]
        on_col = vert_flat[mrow[rows, None, None] * kv_len + torch.clamp(key, max=kv_len - 1)]
        key_ok = b_ok[..., None] & (key < kv_len)  # [C, Wc, bn]
        keep_b = (on_slash | on_col[:, :, None, :]) & key_ok[:, :, None, :]
        keep = torch.cat([keep_b.permute(0, 2, 1, 3).reshape(n_c, block_m, w_c * block_n),
                          c_ok[:, None, :].expand(-1, block_m, -1)], -1)  # [C, bm, N]
        if causal:
            pos = torch.cat([key.reshape(n_c, -1), ci], 1)  # [C, N]
            q_pos = m_of[rows, None] * block_m + tok_m  # [C, bm]
            keep = keep & (pos[:, None, :] <= q_pos[:, :, None] + (kv_len - q_len))
        o_c, lse_c = softmax_rows(s.masked_fill(~keep, float("-inf")), vg)
        row_bad = (keep & bad[:, None, :]).any(-1)  # [C, bm]
        outs.append(o_c.masked_fill(row_bad[..., None], float("nan")))
        lses.append(lse_c.squeeze(-1).masked_fill(row_bad, float("nan")))
        r0 = r1
    inverse = torch.argsort(order)
    o = torch.cat(outs)[inverse].reshape(batch, n_q_heads, n_qb * block_m, head_dim)[:, :, :q_len]
    lse = torch.cat(lses)[inverse].reshape(batch, n_q_heads, n_qb * block_m)[:, :, :q_len]
    return o.to(q.dtype), lse.to(lse_dtype)
