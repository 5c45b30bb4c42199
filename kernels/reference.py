"""Plain PyTorch twins of the kernel launchers (same signatures, same outputs).

They are the CPU path of ``sparse_attn`` and the readable statement of what each
kernel computes. They never build more than a bounded chunk of the Lq x Lk score
matrix: query blocks are processed in chunks, and only the kept key blocks are
gathered. They are differentiable through autograd.
"""

import math

import torch

# Upper bound, in bytes, on the score chunk and on the gathered K/V chunk.
CHUNK_BYTES = 64 * 1024 * 1024


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad_blocks(x, block, n_blocks):
    """[B, H, L, D] -> [B, H, n_blocks, block, D], zero padded at the end."""
    pad = n_blocks * block - x.shape[2]
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(x.shape[0], x.shape[1], n_blocks, block, x.shape[3])


def block_sparse_fwd_ref(q, k, v, counts, indices, block_m, block_n, causal, scale, chunk_bytes=CHUNK_BYTES):
    """Reference of :func:`block_sparse_fwd` (same arguments, same ``(o, lse)``).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        counts: ``[Bm, Hm, NQB]`` int; indices: ``[Bm, Hm, NQB, W]`` sorted key blocks.
        block_m, block_n: block size of the mask.
        causal: bottom-right causal masking (query i sees key j iff j <= i + Lk - Lq).
        scale: softmax scale.

    Returns:
        o ``[B, Hq, Lq, D]`` in q's dtype, lse ``[B, Hq, Lq]`` float32 (float64 for float64 inputs).
    """
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    n_qb, width = indices.shape[2], indices.shape[3]
    n_kb = max(1, math.ceil(kv_len / block_n))
    mask_heads = counts.shape[1]
    cdt = _compute_dtype(q.dtype)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    # A "unit" is one query block of one mask head together with every query head
    # that uses that head's K/V and mask: the G heads of a GQA group share one gather.
    shared = not (mask_heads == n_q_heads and group > 1)
    g_u = group if shared else 1
    n_units_h = n_kv_heads if shared else n_q_heads
    qb = _pad_blocks(q.to(cdt), block_m, n_qb)  # [B, Hq, NQB, bm, D]
    if shared:
        qb = qb.reshape(batch, n_kv_heads, group, n_qb, block_m, head_dim).transpose(2, 3)
    qu = qb.reshape(batch * n_units_h * n_qb, g_u * block_m, head_dim)  # [R, G*bm, D]
    kf = _pad_blocks(k.to(cdt), block_n, n_kb).reshape(-1, block_n, head_dim)  # [B*Hkv*NKB, bn, D]
    vf = _pad_blocks(v.to(cdt), block_n, n_kb).reshape(-1, block_n, head_dim)

    cnt = counts.expand(batch, n_units_h, n_qb).reshape(-1).long()  # [R]
    idx = indices.expand(batch, n_units_h, n_qb, width).reshape(-1, width).long()  # [R, W]
    slot_ok = torch.arange(width, device=q.device)[None, :] < cnt[:, None]  # [R, W]
    idx = torch.where(slot_ok, idx, 0)
    b_of = torch.arange(batch, device=q.device).repeat_interleave(n_units_h * n_qb)
    h_of = torch.arange(n_units_h, device=q.device).repeat_interleave(n_qb).repeat(batch)
    m_of = torch.arange(n_qb, device=q.device).repeat(batch * n_units_h)
    kv_head = h_of if shared else h_of // group
    flat = (b_of * n_kv_heads + kv_head)[:, None] * n_kb + idx  # [R, W]

    tok_n = torch.arange(block_n, device=q.device)
    tok_m = torch.arange(block_m, device=q.device).repeat(g_u)  # [G*bm]
    n_rows = qu.shape[0]
    per_row = max(1, g_u * block_m * width * block_n + 2 * width * block_n * head_dim) * 4
    step = max(1, chunk_bytes // per_row)
    outs, lses = [], []
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        kg = kf[flat[r0:r1]].reshape(r1 - r0, width * block_n, head_dim)  # [C, W*bn, D]
        vg = vf[flat[r0:r1]].reshape(r1 - r0, width * block_n, head_dim)
        s = torch.bmm(qu[r0:r1], kg.transpose(1, 2)) * scale  # [C, G*bm, W*bn]
        key_pos = (idx[r0:r1, :, None] * block_n + tok_n).reshape(r1 - r0, 1, -1)  # [C, 1, W*bn]
        keep = (slot_ok[r0:r1, :, None].expand(-1, -1, block_n).reshape(r1 - r0, 1, -1)) & (key_pos < kv_len)
        if causal:
            q_pos = (m_of[r0:r1, None] * block_m + tok_m)[:, :, None]  # [C, G*bm, 1]
            keep = keep & (key_pos <= q_pos + (kv_len - q_len))
        s = s.masked_fill(~keep, float("-inf"))
        m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else torch.full_like(s[..., :1], float("-inf"))
        m_ref = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m_ref)
        l_sum = p.sum(dim=-1, keepdim=True)
        seen = l_sum > 0
        l_safe = torch.where(seen, l_sum, torch.ones_like(l_sum))
        outs.append(torch.bmm(p, vg) / l_safe)
        lses.append(torch.where(seen, m_ref + torch.log(l_safe), torch.full_like(l_safe, float("-inf"))).squeeze(-1))
    o = torch.cat(outs) if outs else qu.new_zeros(qu.shape)
    lse = torch.cat(lses) if lses else qu.new_zeros(qu.shape[:2])
    o = o.reshape(batch, n_units_h, n_qb, g_u, block_m, head_dim)
    lse = lse.reshape(batch, n_units_h, n_qb, g_u, block_m)
    if shared:
        o, lse = o.transpose(2, 3), lse.transpose(2, 3)
    o = o.reshape(batch, n_q_heads, n_qb * block_m, head_dim)[:, :, :q_len]
    lse = lse.reshape(batch, n_q_heads, n_qb * block_m)[:, :, :q_len]
    return o.to(q.dtype), lse.to(lse_dtype)
