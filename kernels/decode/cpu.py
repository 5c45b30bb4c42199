"""The PyTorch decode path for CPU tensors: gather the selected pages, attend with the group packed as rows.

Same signature and outputs as :func:`sparse_attn_kernels.decode.fwd.decode_fwd` (``n_splits`` is
accepted and ignored: one pass per (row, kv head) needs no split). Work is chunked over
(batch row, kv head) pairs so that the gathered K/V of a chunk stay within ``CHUNK_BYTES`` and
in cache while they are read. Keys past ``cache_seqlens``, list entries past ``counts`` and pages
outside the list never reach an output; a row that keeps a non-finite value gets NaN.
"""

import torch

from .._common.softmax import accum_dtype, softmax_rows
from .._common.workspace import workspace_buffer

# Gathered K + V per chunk. 2026-12-03, 32k context, 8 kv heads, 1/8 of the pages, attention alone (min / median
# of 60 calls): EPYC with 32 MiB of L3: 4.4-4.6 / 4.8-5.1 ms at 16 MiB, 4.8-4.9 / 5.4-6.2 ms at 32 MiB, 6.2 ms at
# 2-4 MiB (more chunks, ~40 small ops each); Xeon with 260 MiB of L3: 4.05 ms at 16 MiB, 3.9 ms at 32 MiB.
CHUNK_BYTES = 16 * 1024 * 1024


def _rows(cache):
    """``[N, D]`` view of a cache's key rows, or None when its layout has none (then indexing is elementwise)."""
    try:
        return cache.view(-1, cache.shape[-1])
    except RuntimeError:
        return None


def _select_rows(rows, idx, role):
    """``rows.index_select(0, idx)``, written into this thread's reusable buffer for ``role`` when it fits.

    The result is only valid until the next call with the same role (the chunk loop uses it at once)."""
    buf = workspace_buffer(role, idx.numel() * rows.shape[1], rows)
    if buf is None:
        return rows.index_select(0, idx)
    return torch.index_select(rows, 0, idx, out=buf.view(idx.numel(), rows.shape[1]))


def _gather(cache, block_table, b_idx, h_idx, pg, page_size, role="k"):
    """Keys of pages ``pg [n, W]`` for (batch row, kv head) pairs ``b_idx, h_idx [n]``: ``[n, W * P, D]``.

    Whole key rows are copied with ``index_select`` from a flat ``[N, D]`` view when the cache has one, into
    a per-thread buffer of ``role`` that the next gather of that role overwrites.
    """
    offs = torch.arange(page_size, device=cache.device)
    rows = _rows(cache)
    if block_table is None and rows is not None and cache.shape[2] % page_size == 0:
        # whole pages are contiguous [P * D] runs: copy them as such (far fewer, longer copies than key rows)
        n_pages = cache.shape[2] // page_size
        flat = (b_idx * cache.shape[1] + h_idx)[:, None] * n_pages + pg.clamp(max=n_pages - 1)  # [n, W]
        page_rows = cache.view(-1, page_size * cache.shape[-1])
        return _select_rows(page_rows, flat.flatten(), role).view(flat.shape[0], -1, cache.shape[-1])
    if block_table is None:  # [B, Hkv, Lmax, D]
        n_tok = cache.shape[2]
        tok = (pg[:, :, None] * page_size + offs).clamp(max=n_tok - 1).flatten(1)  # [n, W*P]
        if rows is None:
            return cache[b_idx[:, None], h_idx[:, None], tok]
        flat = (b_idx * cache.shape[1] + h_idx)[:, None] * n_tok + tok  # [n, W*P]
    else:  # [pages, P, Hkv, D]
        phys = block_table[b_idx[:, None], pg].long().clamp(min=0)  # [n, W]
        if rows is None:
            return cache[phys[:, :, None], offs[None, None, :], h_idx[:, None, None]].flatten(1, 2)
        n_kv = cache.shape[2]
        flat = ((phys[:, :, None] * page_size + offs) * n_kv + h_idx[:, None, None]).flatten(1)  # [n, W*P]
    return _select_rows(rows, flat.flatten(), role).view(flat.shape[0], flat.shape[1], cache.shape[-1])


def _scores(k, q, scale):
    """Scaled scores ``[n, R, K]`` of queries ``q [n, R, D]`` against keys ``k [n, K, D]``.

    Computed as ``k @ q^T`` (keys as the rows of the product) and transposed: with a few query rows, the
    BLAS kernel for ``q @ k^T`` packs all of K and runs at about half the speed (2026-12-03, EPYC, 8 kv heads,
    4096 keys, D 128: 0.94 against 1.73 ms)."""
    return (torch.matmul(k, q.transpose(1, 2)) * scale).transpose(1, 2).contiguous()


def _zero_nonfinite(v, fix, keep):
    """Zero the non-finite values among the few keys ``fix [n, K]`` (those not every row sees), so that a row
    that excludes them stays exact; ``bad [n, R]`` marks rows that keep one (or None). Keys every row sees
    need no check: a non-finite value there reaches every row's output anyway."""
    idx = fix.flatten().nonzero().squeeze(1)  # a page tail and the newest Lq keys per (row, head): small
    if idx.numel() == 0:
        return v, None
    rows = v.reshape(-1, v.shape[-1])
    sub = rows.index_select(0, idx)
    ok = torch.isfinite(sub).all(-1)
    if bool(ok.all()):
        return v, None
    bad_tok = torch.zeros(fix.numel(), dtype=torch.bool, device=v.device)
    bad_tok[idx[~ok]] = True
    rows = rows.clone()
    rows[idx[~ok]] = 0.0
    bad = (keep & bad_tok.view(fix.shape)[:, None, :]).any(-1)  # [n, R]
    return rows.view(v.shape), bad


def _softmax_nan_rows(s, v, bad):
    """``softmax_rows`` of scores ``s [n, R, K]`` over ``v [n, K, D]``: ``(o [n, R, D], lse [n, R])``, with NaN in
    both for the rows of ``bad [n, R]`` (they keep a non-finite value; None: no such row)."""
    o, lse = softmax_rows(s, v)
    lse = lse.squeeze(-1)
    if bad is not None:
        o = o.masked_fill(bad[:, :, None], float("nan"))
        lse = lse.masked_fill(bad, float("nan"))
    return o, lse


def _softmax_seen(s, v, dtype):
    """Attention of scores ``s [n, K, R]`` (keys as rows, every key seen by every row, K >= 1) over ``v [n, K, D]``:
    ``(o [n, R, D]`` in ``dtype``, ``lse [n, R])``. No mask and no empty row: the softmax in a few ops, over the
    key dim of the product as it comes (a non-finite value reaches the output as NaN, as every row sees it)."""
    m = s.amax(dim=1, keepdim=True)  # [n, 1, R]
    p = torch.exp(s - m)
    l_sum = p.sum(dim=1)  # [n, R]
    o = torch.bmm(p.transpose(1, 2), v) / l_sum[..., None]  # [n, R, D]
    return o.to(dtype), m.squeeze(1) + torch.log(l_sum)


def _prefix_lists(counts, pages):
    """Whether every (row, kv head) lists pages ``0 .. count - 1`` with one count per row (dense decode)."""
    width = pages.shape[-1]
    cnt = counts.long()
    used = torch.arange(width, device=pages.device) < cnt[..., None]  # [B, Hkv, W]
    in_order = (pages.long() == torch.arange(width, device=pages.device)) | ~used
    return bool(in_order.all()) and bool((cnt == cnt[:, :1]).all())


def _decode_prefix(q, k_cache, v_cache, seqlens, counts, causal, scale, page_size, o, lse):
    """Contiguous cache, every row attends its first pages: attention over views of the cache, no copy."""
    batch, n_kv_heads, n_rows, head_dim = o.shape
    q_len = q.shape[2]
    acc = accum_dtype(q.dtype)
    qg = q.reshape(batch, n_kv_heads, n_rows, head_dim)
    row_q = torch.arange(n_rows, device=q.device) % q_len  # [R]
    for b in range(batch):
        n_tok = min(int(counts[b, 0]) * page_size, k_cache.shape[2])
        seq = int(seqlens[b])
        if n_tok == 0 or seq <= 0:  # an empty row sees nothing
            o[b], lse[b] = 0.0, float("-inf")
            continue
        k, v = k_cache[b, :, :n_tok], v_cache[b, :, :n_tok]  # [Hkv, n_tok, D] views
        if acc != k.dtype:
            k, v = k.to(acc), v.to(acc)
        tok = torch.arange(n_tok, device=q.device)
        keep = (tok < seq)[None, :].expand(n_rows, n_tok)  # [R, n_tok]
        first_fix = min(seq, n_tok)  # keys from here on are not seen by every row
        if causal and q_len > 1:
            keep = keep & (tok[None, :] <= (seq - q_len + row_q)[:, None])
            first_fix = max(0, min(first_fix, seq - q_len + 1))
        s = _scores(k, qg[b].to(acc), scale)  # [Hkv, R, n_tok]
        s.masked_fill_(~keep, float("-inf"))
        tail = v[:, first_fix:]
        bad = None
        if tail.numel() and not bool(torch.isfinite(tail).all()):  # zero them; rows that keep one get NaN
            bad_tok = ~torch.isfinite(tail).all(-1)  # [Hkv, n_tail]
            v = v.clone()
            v[:, first_fix:][bad_tok] = 0.0
            bad = (keep[None, :, first_fix:] & bad_tok[:, None, :]).any(-1)  # [Hkv, R]
        o_b, lse[b] = _softmax_nan_rows(s, v, bad)  # [Hkv, R, D], [Hkv, R]
        o[b] = o_b.to(q.dtype)


def decode_fwd_cpu(q, k_cache, v_cache, seqlens, counts, pages, block_table, causal, scale, page_size,
                   n_splits=None):
    """Decode attention over the selected pages with PyTorch ops (see :func:`~.fwd.decode_fwd`).

    Returns:
        ``(o [B, Hq, Lq, D]`` in q's dtype, ``lse [B, Hq, Lq]`` float32, float64 for float64 inputs).
    """
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads = k_cache.shape[2] if block_table is not None else k_cache.shape[1]
    group = n_q_heads // n_kv_heads
    n_rows, width, dev = group * q_len, pages.shape[-1], q.device
    acc = accum_dtype(q.dtype)
    o = torch.empty((batch, n_kv_heads, n_rows, head_dim), dtype=q.dtype, device=dev)
    lse = torch.empty((batch, n_kv_heads, n_rows), dtype=acc, device=dev)
    if q.numel() == 0:
        return o.view(q.shape), lse.view(q.shape[:3])
    if block_table is None and _prefix_lists(counts.expand(batch, n_kv_heads), pages.expand(batch, n_kv_heads, width)):
        _decode_prefix(q, k_cache, v_cache, seqlens, counts.expand(batch, n_kv_heads), causal, scale, page_size, o, lse)
        return o.view(batch, n_kv_heads, group, q_len, head_dim).reshape(q.shape), lse.view(q.shape[:3])
    qg = q.reshape(batch, n_kv_heads, n_rows, head_dim)  # rows of a group: (head, query), head-major
    pairs = torch.arange(batch * n_kv_heads, device=dev)
    b_all, h_all = pairs // n_kv_heads, pairs % n_kv_heads
    cnt_all = counts.expand(batch, n_kv_heads).reshape(-1).long()  # [B*Hkv]
    pg_all = pages.expand(batch, n_kv_heads, width).reshape(-1, width).long()  # [B*Hkv, W]
    seq_all = seqlens.long()[b_all]  # [B*Hkv]
    row_q = torch.arange(n_rows, device=dev) % q_len  # [R]
    step = max(1, CHUNK_BYTES // max(1, 2 * width * page_size * head_dim * k_cache.element_size()))
    offs = torch.arange(page_size, device=dev)
    # every row sees every listed key (full lists of whole pages or keys below the row's length, one query or
    # no causal cut): nothing to mask and no value to check, fewer ops per chunk (2026-12-07, Xeon, 32k keys,
    # 8 kv heads, 1/8: token lists 5.94 -> 5.65 ms, pages 4.93 -> 4.44 ms, medians of two runs each)
    clean = width > 0 and (q_len == 1 or not causal) and bool((cnt_all == width).all()) and bool(
        ((pg_all.amax(-1) + 1) * page_size <= seq_all).all())
    for c0 in range(0, batch * n_kv_heads, step):
        sl = slice(c0, min(c0 + step, batch * n_kv_heads))
        b_idx, h_idx, seq = b_all[sl], h_all[sl], seq_all[sl]
        if clean:
            pg = pg_all[sl]
            k = _gather(k_cache, block_table, b_idx, h_idx, pg, page_size, "k").to(acc)  # [n, W*P, D]
            s = torch.matmul(k, (qg[b_idx, h_idx].to(acc) * scale).transpose(1, 2))  # [n, W*P, R], keys as rows
            v = _gather(v_cache, block_table, b_idx, h_idx, pg, page_size, "v").to(acc)  # [n, W*P, D]
            o[b_idx, h_idx], lse[b_idx, h_idx] = _softmax_seen(s, v, q.dtype)
            continue
        entry_ok = torch.arange(width, device=dev)[None, :] < cnt_all[sl, None]  # [n, W]
        pg = torch.where(entry_ok, pg_all[sl], 0)
        tok = pg[:, :, None] * page_size + offs  # [n, W, P]
        tok_ok = (entry_ok[:, :, None] & (tok < seq[:, None, None])).flatten(1)  # [n, W*P]
        k = _gather(k_cache, block_table, b_idx, h_idx, pg, page_size, "k").to(acc)  # [n, W*P, D]
        s = _scores(k, qg[b_idx, h_idx].to(acc), scale)  # [n, R, W*P]
        # V is gathered after the scores, so that the gathered K is still in cache when the product reads it
        v = _gather(v_cache, block_table, b_idx, h_idx, pg, page_size, "v").to(acc)  # [n, W*P, D]
        keep = tok_ok[:, None, :]  # [n, 1|R, W*P]
        fix = ~tok_ok  # keys no row sees (past the length, unused entries): zeroed if not finite
        if causal and q_len > 1:
            last = seq[:, None] - q_len + row_q[None, :]  # [n, R]
            keep = keep & (tok.flatten(1)[:, None, :] <= last[:, :, None])
            fix = fix | (tok.flatten(1) > (seq[:, None] - q_len))  # ... and the newest keys some rows see
        s.masked_fill_(~keep, float("-inf"))
        v, bad = _zero_nonfinite(v, fix, keep)
        o_c, lse_c = _softmax_nan_rows(s, v, bad)  # [n, R, D], [n, R]
        o[b_idx, h_idx] = o_c.to(q.dtype)
        lse[b_idx, h_idx] = lse_c
    return o.view(batch, n_kv_heads, group, q_len, head_dim).reshape(q.shape), lse.view(q.shape[:3])
