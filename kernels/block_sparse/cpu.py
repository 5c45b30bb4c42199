"""Block-sparse attention forward for CPU tensors, built on PyTorch's fused CPU attention.

Each query block (with the query heads of its GQA group when they share the mask) gathers
only its kept key blocks and runs PyTorch's flash-style CPU attention on them, so no score
matrix is materialized and no elementwise pass over scores runs in Python. Query blocks are
grouped by their exact number of kept blocks, so gathered keys need no padding; only the
query blocks that touch the ragged key tail or cross the causal diagonal get an additive
mask. Work is chunked so that gathered K/V stay within a bounded buffer.

Same signature and outputs as :func:`sparse_attn_kernels.block_sparse.fwd.block_sparse_fwd`.
"""

import math

import torch

CHUNK_BYTES = 64 * 1024 * 1024  # gathered K + V per chunk


def _flash_cpu():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def available() -> bool:
    """True when this torch build has the fused CPU attention this path runs on."""
    return _flash_cpu() is not None


class _Rows:
    """Query rows of the computation: one per (batch, mask head unit, query block)."""

    def __init__(self, q, k, counts, indices, block_m, block_n):
        self.batch, self.n_q_heads, self.q_len, self.head_dim = q.shape
        self.n_kv_heads, self.kv_len = k.shape[1], k.shape[2]
        self.group = self.n_q_heads // self.n_kv_heads
        self.block_m, self.block_n = block_m, block_n
        self.n_qb, self.width = indices.shape[2], indices.shape[3]
        self.n_kb = max(1, math.ceil(self.kv_len / block_n))
        # the G query heads of a GQA group share one gather unless the mask differs per query head
        self.shared = not (counts.shape[1] == self.n_q_heads and self.group > 1)
        self.g_u = self.group if self.shared else 1
        self.n_units = self.n_kv_heads if self.shared else self.n_q_heads
        dev = q.device
        self.count = counts.expand(self.batch, self.n_units, self.n_qb).reshape(-1).long()  # [R]
        self.idx = indices.expand(self.batch, self.n_units, self.n_qb, self.width).reshape(-1, self.width).long()
        b_of = torch.arange(self.batch, device=dev).repeat_interleave(self.n_units * self.n_qb)
        u_of = torch.arange(self.n_units, device=dev).repeat_interleave(self.n_qb).repeat(self.batch)
        self.m_of = torch.arange(self.n_qb, device=dev).repeat(self.batch * self.n_units)  # [R]
        kv_head = u_of if self.shared else u_of // self.group
        self.kv_base = (b_of * self.n_kv_heads + kv_head) * self.n_kb  # [R]
        self.n_rows = self.count.numel()

    def gather_queries(self, q):
        """[B, Hq, Lq, D] -> [R, G*bm, D] (zero padded to whole blocks)."""
        pad = self.n_qb * self.block_m - self.q_len
        x = torch.nn.functional.pad(q, (0, 0, 0, pad)) if pad else q
        x = x.reshape(self.batch, self.n_q_heads, self.n_qb, self.block_m, self.head_dim)
        if self.shared:
            x = x.reshape(self.batch, self.n_kv_heads, self.group, self.n_qb, self.block_m, self.head_dim)
            x = x.transpose(2, 3)
        return x.reshape(self.n_rows, self.g_u * self.block_m, self.head_dim)

    def scatter_rows(self, x):
        """[R, G*bm, ...] -> [B, Hq, Lq, ...] (inverse of :meth:`gather_queries`)."""
        tail = x.shape[2:]
        x = x.reshape(self.batch, self.n_units, self.n_qb, self.g_u, self.block_m, *tail)
        if self.shared:
            x = x.transpose(2, 3)
        return x.reshape(self.batch, self.n_q_heads, self.n_qb * self.block_m, *tail)[:, :, : self.q_len]

    def key_blocks(self, x):
        """[B, Hkv, Lk, D] -> [B*Hkv*NKB, bn*D] (zero padded)."""
        pad = self.n_kb * self.block_n - self.kv_len
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
        return x.reshape(-1, self.block_n * self.head_dim)

    def needs_mask(self, causal):
        """[R] bool: the row's kept blocks include the ragged key tail or cross the causal diagonal."""
        slot_ok = torch.arange(self.width, device=self.idx.device) < self.count[:, None]
        last = torch.where(slot_ok, self.idx, -1).amax(1)  # [R] last kept block (-1 if none)
        need = (last == self.n_kb - 1) & (self.kv_len % self.block_n != 0)
        if causal:
            first_q = self.m_of * self.block_m
            need = need | ((last + 1) * self.block_n - 1 > first_q + (self.kv_len - self.q_len))
        return need

    def additive_mask(self, rows, n_blocks, causal, dtype):
        """[C, 1, G*bm, n*bn] additive mask (0 keep, -inf drop) and [C, G*bm] rows that keep nothing."""
        dev = rows.device
        key_pos = (self.idx[rows, :n_blocks, None] * self.block_n
                   + torch.arange(self.block_n, device=dev)).reshape(len(rows), 1, -1)  # [C, 1, n*bn]
        keep = key_pos < self.kv_len
        if causal:
            q_pos = self.m_of[rows, None] * self.block_m + torch.arange(self.block_m, device=dev).repeat(self.g_u)
            keep = keep & (key_pos <= q_pos[:, :, None] + (self.kv_len - self.q_len))  # [C, G*bm, n*bn]
        add = torch.zeros(keep.shape, dtype=dtype, device=dev).masked_fill_(~keep, float("-inf"))
        return add.unsqueeze(1), ~keep.any(-1).expand(len(rows), self.g_u * self.block_m)


def block_sparse_fwd_cpu(q, k, v, counts, indices, block_m, block_n, causal, scale, chunk_bytes=CHUNK_BYTES):
    """Block-sparse attention on CPU tensors; differentiable through autograd.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        counts: int ``[Bm, Hm, NQB]``; indices: int ``[Bm, Hm, NQB, W]`` (sorted key blocks).
        block_m, block_n: the mask's block size (any positive ints).
        causal: bottom-right causal masking; scale: softmax scale.

    Returns:
        ``(o, lse)``: o ``[B, Hq, Lq, D]`` in q's dtype (0 on rows that see no key), lse float32
        ``[B, Hq, Lq]`` (float64 for float64 inputs; -inf on rows that see no key).
    """
    flash = _flash_cpu()
    r = _Rows(q, k, counts, indices, block_m, block_n)
    qr = r.gather_queries(q)  # [R, G*bm, D]
    kb, vb = r.key_blocks(k), r.key_blocks(v)  # [B*Hkv*NKB, bn*D]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))

    # rows ordered by (needs a mask, count): each run of equal keys is one unpadded batch
    need = r.needs_mask(causal)
    order = torch.argsort(need.long() * (r.width + 1) + r.count, stable=True)
    keys = (need.long() * (r.width + 1) + r.count)[order]
    runs, run_len = torch.unique_consecutive(keys, return_counts=True)
    cap = max(1, chunk_bytes // (2 * block_n * r.head_dim * q.element_size()))  # K+V blocks per chunk
    buf_k = buf_v = None
    outs, lses = [], []
    start = 0
    for key, n_run in zip(runs.tolist(), run_len.tolist()):
        masked, n_blk = key // (r.width + 1), key % (r.width + 1)
        if n_blk == 0:  # rows that see no key
            outs.append(qr.new_zeros((n_run, r.g_u * block_m, r.head_dim)))
            lses.append(torch.full((n_run, r.g_u * block_m), float("-inf"), dtype=lse_dtype, device=q.device))
            start += n_run
            continue
        step = max(1, cap // n_blk)  # rows per chunk; step * n_blk <= max(cap, W) blocks
        for a in range(start, start + n_run, step):
            rows = order[a:min(start + n_run, a + step)]
            flat = (r.kv_base[rows, None] + r.idx[rows, :n_blk]).reshape(-1)  # [C*n]
            shape = (len(rows), 1, n_blk * block_n, r.head_dim)
            if grad:
                kg, vg = kb.index_select(0, flat), vb.index_select(0, flat)
            else:  # reuse one buffer: no page faults for every chunk
                if buf_k is None:
                    n_buf = max(cap, r.width)
                    buf_k, buf_v = kb.new_empty((n_buf, kb.shape[1])), vb.new_empty((n_buf, vb.shape[1]))
                kg = torch.index_select(kb, 0, flat, out=buf_k[: flat.numel()])
                vg = torch.index_select(vb, 0, flat, out=buf_v[: flat.numel()])
            qg = qr.index_select(0, rows).unsqueeze(1)  # [C, 1, G*bm, D]
            if masked:
                add, empty = r.additive_mask(rows, n_blk, causal, q.dtype)
                o, lse = flash(qg, kg.view(shape), vg.view(shape), attn_mask=add, scale=scale)
                lse = lse.squeeze(1).masked_fill(empty, float("-inf"))
            else:
                o, lse = flash(qg, kg.view(shape), vg.view(shape), scale=scale)
                lse = lse.squeeze(1)
            outs.append(o.squeeze(1))
            lses.append(lse.to(lse_dtype))
        start += n_run
    inverse = torch.argsort(order)
    o = torch.cat(outs).index_select(0, inverse)
    lse = torch.cat(lses).index_select(0, inverse)
    return r.scatter_rows(o), r.scatter_rows(lse)
