"""Block-sparse attention forward for CPU tensors, built on PyTorch's fused CPU attention.

Each query block (with the query heads of its GQA group when they share the mask) gathers
only its kept key blocks and runs PyTorch's flash-style CPU attention on them, so no score
matrix is materialized and no elementwise pass over scores runs in Python. Query blocks are
grouped by their exact number of kept blocks, so gathered keys need no padding; only the
query blocks that touch the ragged key tail or cross the causal diagonal get an additive
mask. Work is chunked so that gathered K/V stay within a bounded buffer.

Same signature and outputs as :func:`sparse_attn_kernels.block_sparse.fwd.block_sparse_fwd`.
"""

from typing import Optional, Tuple

import torch

from .._common.rows import BlockRows
from .._common.softmax import accum_dtype

CHUNK_BYTES = 8 * 1024 * 1024  # gathered K + V per chunk: small enough to stay in cache


def _flash_cpu():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def available() -> bool:
    """True when this torch build has the fused CPU attention this path runs on."""
    return _flash_cpu() is not None


class _Rows(BlockRows):
    """Rows of the fused CPU path: :class:`BlockRows` plus the chunk plan and the additive masks."""

    def key_blocks(self, x):
        """[B, Hkv, Lk, D] -> [B*Hkv*NKB, bn*D] (zero padded): one gather row per block."""
        return super().key_blocks(x).reshape(-1, self.block_n * self.head_dim)

    def needs_mask(self, causal):
        """[R] bool: the row's kept blocks include the ragged key tail or cross the causal diagonal."""
        last = torch.where(self.slot_ok, self.idx, -1).amax(1)  # [R] last kept block (-1 if none)
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


    def plan(self, causal, cap):
        """Chunks of rows: ``(rows, n_blocks, masked)``; rows of a chunk share their exact count.

        Rows are ordered by (needs a mask, count), so each chunk gathers ``n_blocks`` key blocks
        per row with no padding, and at most ``max(cap, W)`` blocks in all.
        """
        need = self.needs_mask(causal)
        key = need.long() * (self.width + 1) + self.count
        order = torch.argsort(key, stable=True)
        runs, run_len = torch.unique_consecutive(key[order], return_counts=True)
        chunks, start = [], 0
        for run, n_run in zip(runs.tolist(), run_len.tolist()):
            masked, n_blk = run // (self.width + 1), run % (self.width + 1)
            step = n_run if n_blk == 0 else max(1, cap // n_blk)
            for a in range(start, start + n_run, step):
                chunks.append((order[a:min(start + n_run, a + step)], n_blk, bool(masked)))
            start += n_run
        return order, chunks

    def gather(self, blocks, rows, n_blk, out=None):
        """Kept key blocks of ``rows``: ``[C, 1, n*bn, D]`` (into ``out`` when given)."""
        flat = (self.kv_base[rows, None] + self.idx[rows, :n_blk]).reshape(-1)  # [C*n]
        if out is None:
            g = blocks.index_select(0, flat)
        else:
            g = torch.index_select(blocks, 0, flat, out=out[: flat.numel()])
        return g.view(len(rows), 1, n_blk * self.block_n, self.head_dim), flat


def _cap(block_n, head_dim, dtype, chunk_bytes):
    """K+V blocks gathered per chunk."""
    return max(1, chunk_bytes // (2 * block_n * head_dim * torch.empty((), dtype=dtype).element_size()))


@torch.no_grad()
def block_sparse_fwd_cpu(q, k, v, counts, indices, block_m, block_n, causal, scale, chunk_bytes=CHUNK_BYTES):
    """Block-sparse attention forward on CPU tensors (not differentiable by itself: see
    :func:`block_sparse_attn_cpu`).

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
    lse_dtype = accum_dtype(q.dtype)
    cap = _cap(block_n, r.head_dim, q.dtype, chunk_bytes)
    n_buf = max(cap, r.width)  # one reused gather buffer: no page faults for every chunk
    buf_k, buf_v = kb.new_empty((n_buf, kb.shape[1])), vb.new_empty((n_buf, vb.shape[1]))
    order, chunks = r.plan(causal, cap)
    o = qr.new_zeros(qr.shape)  # rows that see no key stay 0
    lse = torch.full(qr.shape[:2], float("-inf"), dtype=lse_dtype, device=q.device)
    for rows, n_blk, masked in chunks:
        if n_blk == 0:
            continue
        kg, _ = r.gather(kb, rows, n_blk, buf_k)  # [C, 1, n*bn, D]
        vg, _ = r.gather(vb, rows, n_blk, buf_v)
        qg = qr.index_select(0, rows).unsqueeze(1)  # [C, 1, G*bm, D]
        if masked:
            add, empty = r.additive_mask(rows, n_blk, causal, q.dtype)
            o_c, lse_c = flash(qg, kg, vg, attn_mask=add, scale=scale)
            lse_c = lse_c.squeeze(1).masked_fill(empty, float("-inf"))
        else:
            o_c, lse_c = flash(qg, kg, vg, scale=scale)
            lse_c = lse_c.squeeze(1)
        o.index_copy_(0, rows, o_c.squeeze(1))
        lse.index_copy_(0, rows, lse_c.to(lse_dtype))
    return r.scatter_rows(o), r.scatter_rows(lse)


@torch.no_grad()
def block_sparse_bwd_cpu(do, q, k, v, o, lse, counts, indices, block_m, block_n, causal, scale,
                         chunk_bytes=CHUNK_BYTES):
    """Gradients of :func:`block_sparse_fwd_cpu` (through ``o``; not through ``lse``).

    Each chunk of rows runs PyTorch's fused CPU attention backward on its gathered blocks;
    dK/dV of the gathered blocks are summed back with ``index_add_`` (deterministic on CPU).

    Returns:
        ``(dq, dk, dv)`` in the dtypes and shapes of q, k, v; rows that saw no key get dq = 0.
    """
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    r = _Rows(q, k, counts, indices, block_m, block_n)
    qr, dor, orr = r.gather_queries(q), r.gather_queries(do), r.gather_queries(o)  # [R, G*bm, D]
    lser = r.gather_queries(lse.unsqueeze(-1)).squeeze(-1)  # [R, G*bm]
    kb, vb = r.key_blocks(k), r.key_blocks(v)  # [B*Hkv*NKB, bn*D]
    acc = accum_dtype(q.dtype)
    dkb = torch.zeros(kb.shape, dtype=acc, device=q.device)
    dvb = torch.zeros(vb.shape, dtype=acc, device=q.device)
    dqr = torch.zeros(qr.shape, dtype=q.dtype, device=q.device)
    order, chunks = r.plan(causal, _cap(block_n, r.head_dim, q.dtype, chunk_bytes))
    for rows, n_blk, masked in chunks:
        if n_blk == 0:
            continue
        kg, flat = r.gather(kb, rows, n_blk)
        vg, _ = r.gather(vb, rows, n_blk)
        pick = lambda x: x.index_select(0, rows).unsqueeze(1)  # noqa: E731  [C, 1, G*bm, ...]
        lse_c = pick(lser).to(acc)
        add = None
        if masked:
            add, _ = r.additive_mask(rows, n_blk, causal, q.dtype)
            lse_c = lse_c.masked_fill(torch.isneginf(lse_c), 0.0)  # empty rows: exp(-inf - 0) = 0
        dq_c, dk_c, dv_c = flash_bwd(pick(dor), pick(qr), kg, vg, pick(orr), lse_c, 0.0, False,
                                     attn_mask=add, scale=scale)
        dqr.index_copy_(0, rows, dq_c.squeeze(1))
        dkb.index_add_(0, flat, dk_c.reshape(len(flat), -1).to(acc))
        dvb.index_add_(0, flat, dv_c.reshape(len(flat), -1).to(acc))
    dq = r.scatter_rows(dqr).contiguous()
    kv_shape = (r.batch, r.n_kv_heads, r.n_kb * block_n, r.head_dim)
    dk = dkb.reshape(kv_shape)[:, :, : r.kv_len].to(k.dtype).contiguous()
    dv = dvb.reshape(kv_shape)[:, :, : r.kv_len].to(v.dtype).contiguous()
    return dq, dk, dv


# ---- differentiable entry point: custom ops, so torch.compile sees one node per pass ----
Tensor = torch.Tensor


@torch.library.custom_op("sparse_attn::block_sparse_attn_fwd_cpu", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, block_m: int, block_n: int,
            causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    o, lse = block_sparse_fwd_cpu(q, k, v, counts, indices, block_m, block_n, causal, scale)
    return o.contiguous(), lse.contiguous()


@_fwd_op.register_fake
def _fwd_fake(q, k, v, counts, indices, block_m, block_n, causal, scale):
    lse_dtype = accum_dtype(q.dtype)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("sparse_attn::block_sparse_attn_bwd_cpu", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Optional[Tensor],
            counts: Tensor, indices: Tensor, block_m: int, block_n: int, causal: bool,
            scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    if dlse is not None and bool((dlse != 0).any()):
        raise ValueError("the CPU path does not differentiate through lse; sparse_attention routes "
                         "return_lse=True with gradients to the reference path instead")
    return block_sparse_bwd_cpu(do, q, k, v, o, lse, counts, indices, block_m, block_n, causal, scale)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, dlse, counts, indices, block_m, block_n, causal, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, counts, indices, block_m, block_n, causal, scale = inputs
    ctx.save_for_backward(q, k, v, *output, counts, indices)
    ctx.config = (block_m, block_n, causal, scale)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, counts, indices = ctx.saved_tensors
    dq, dk, dv = torch.ops.sparse_attn.block_sparse_attn_bwd_cpu(do.contiguous(), q, k, v, o, lse, dlse, counts,
                                                                 indices, *ctx.config)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("sparse_attn::block_sparse_attn_fwd_cpu", _backward, setup_context=_setup_context)


def block_sparse_attn_cpu(q, k, v, counts, indices, block_m, block_n, causal=False, scale=None):
    """Differentiable block-sparse attention on CPU tensors (gradients through ``o``).

    Returns:
        ``(o, lse)`` as :func:`block_sparse_fwd_cpu`.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.sparse_attn.block_sparse_attn_fwd_cpu(
        q, k, v, counts, indices, int(block_m), int(block_n), bool(causal), float(scale))
