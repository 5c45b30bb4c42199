"""Plain PyTorch twins of the kernel launchers (same signatures, same outputs).

They are the CPU path of ``sparse_attn`` and the readable statement of what each
kernel computes. They never build more than a bounded chunk of the Lq x Lk score
matrix: query blocks are processed in chunks, and only the kept key blocks are
gathered. The backward (:func:`block_sparse_bwd_ref`) recomputes the scores chunk by
chunk from the forward's LSE, as the kernels do, instead of keeping them.

:func:`block_sparse_attn_ref` is the differentiable entry point: the forward and the
backward are ``torch.library`` custom ops (``sparse_attn::block_sparse_attn_fwd_ref`` /
``_bwd_ref``) with fake implementations, so ``torch.compile`` traces them whole.
"""

from typing import Optional, Tuple

import torch

from ._common.predicates import NO_PREDICATES, band, entries_keep, flat, unflat
from ._common.autograd import register_backward
from ._common.bias import bias_rows, reduce_bias_grad
from ._common.rows import BlockRows
from ._common.softmax import accum_dtype, softmax_rows

Tensor = torch.Tensor

# Upper bound, in bytes, on the score chunk and on the gathered K/V chunk.
CHUNK_BYTES = 64 * 1024 * 1024


class _Units(BlockRows):
    """The work split shared by the forward and backward references.

    A "unit" is one query block of one mask head together with every query head that uses that
    head's K/V and mask: the G heads of a GQA group share one gather.
    Rows of a unit: ``G * BLOCK_M`` queries; columns: the ``W * BLOCK_N`` keys of its list.
    """

    def __init__(self, q, k, counts, indices, block_m, block_n, causal, scale, preds=NO_PREDICATES, key_bias=None):
        super().__init__(q, k, counts, indices, block_m, block_n, preds.bit_slots)
        self.preds, self.scale = preds, scale
        self.left, self.right = band(causal, preds.window)
        self.cdt = accum_dtype(q.dtype)
        self.flat = self.kv_base[:, None] + self.idx  # [R, W]
        self.tok_n = torch.arange(block_n, device=q.device)
        self.tok_m = torch.arange(block_m, device=q.device).repeat(self.g_u)  # [G*bm] row inside the block
        self.bias_blocks = None
        if key_bias is not None:  # [B*Hq*NKB, bn] per (batch, query head, key block), zero padded
            bias = bias_rows(key_bias, self.batch, self.n_q_heads, self.kv_len, self.cdt)
            bias = torch.nn.functional.pad(bias, (0, self.n_kb * block_n - self.kv_len))
            self.bias_blocks = bias.reshape(-1, block_n)
            # a unit's g-th row group is query head h0 + g: the unit's kv head times G, or its own query head
            u_of = torch.arange(self.n_units, device=q.device).repeat_interleave(self.n_qb).repeat(self.batch)
            first = (self.b_of * self.n_q_heads + u_of * self.g_u) * self.n_kb  # [R]
            heads = torch.arange(self.g_u, device=q.device) * self.n_kb
            self.bias_idx = first[:, None, None] + heads[None, :, None] + self.idx[:, None, :]  # [R, G, W]

    def rows(self, x, value=0.0):
        """[B, Hq, Lq, D] -> [R, G*bm, D] in the compute dtype, padded with ``value``."""
        return self.gather_queries(x.to(self.cdt), value)

    def unrows(self, x):
        """[R, G*bm, D] -> [B, Hq, Lq, D] (inverse of :meth:`rows`)."""
        return self.scatter_rows(x)

    def keys(self, x):
        """[B, Hkv, Lk, D] -> [B*Hkv*NKB, bn, D] in the compute dtype, zero padded."""
        return self.key_blocks(x.to(self.cdt))

    def step(self, per_row_elems, chunk_bytes):
        """Units per chunk so that ``per_row_elems`` fp32/fp64 values per unit fit in ``chunk_bytes``."""
        return max(1, chunk_bytes // (max(1, per_row_elems) * torch.finfo(self.cdt).bits // 8))

    def keep(self, r0, r1):
        """bool ``[C, G*bm, W*bn]``: the token pairs of units [r0, r1) that attention sees."""
        slots = None if self.slots is None else self.slots[r0:r1]
        keep = entries_keep(self.preds, self.left, self.right, self.b_of[r0:r1], self.m_of[r0:r1],
                            self.idx[r0:r1], slots, self.tok_m, self.block_m, self.block_n, self.q_len, self.kv_len)
        return keep & self.slot_ok[r0:r1, None, :, None].expand(-1, -1, -1, self.block_n).reshape(r1 - r0, 1, -1)

    def bias_grad(self, ds, r0, r1, out):
        """Add ``ds [C, G*bm, W*bn]`` summed over each head's rows into ``out [B*Hq*NKB, bn]`` (d key_bias)."""
        c = r1 - r0
        per_head = ds.reshape(c, self.g_u, self.block_m, -1).sum(2)  # [C, G, W*bn]
        out.index_add_(0, self.bias_idx[r0:r1].reshape(-1), per_head.reshape(-1, self.block_n))

    def scores(self, qu, kf, vf, r0, r1):
        """Scaled scores of units [r0, r1) with -inf outside the mask: ``[C, G*bm, W*bn]``, the
        gathered K and V with their non-finite keys zeroed, the keep mask and the rows ``[C, G*bm]``
        that see a non-finite key (their output is NaN; no other row ever reads such a key)."""
        c = r1 - r0
        kg = kf[self.flat[r0:r1]].reshape(c, self.width * self.block_n, self.head_dim)  # [C, W*bn, D]
        vg = vf[self.flat[r0:r1]].reshape(c, self.width * self.block_n, self.head_dim)
        bad = ~(torch.isfinite(kg).all(-1) & torch.isfinite(vg).all(-1))  # [C, W*bn]
        kg, vg = kg.masked_fill(bad[..., None], 0.0), vg.masked_fill(bad[..., None], 0.0)
        keep = self.keep(r0, r1)
        s = torch.bmm(qu[r0:r1], kg.transpose(1, 2)) * self.scale  # [C, G*bm, W*bn]
        if self.bias_blocks is not None:
            bias = self.bias_blocks[self.bias_idx[r0:r1]].reshape(c, self.g_u, 1, -1)  # [C, G, 1, W*bn]
            s = (s.reshape(c, self.g_u, self.block_m, -1) + bias).reshape(s.shape)
        return s.masked_fill(~keep, float("-inf")), kg, vg, keep, (keep & bad[:, None, :]).any(-1)


def block_sparse_fwd_ref(q, k, v, counts, indices, block_m, block_n, causal, scale, chunk_bytes=CHUNK_BYTES,
                         preds=NO_PREDICATES, key_bias=None):
    """Reference of :func:`block_sparse_fwd` (same arguments, same ``(o, lse)``).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        counts: ``[Bm, Hm, NQB]`` int; indices: ``[Bm, Hm, NQB, W]`` sorted key blocks.
        block_m, block_n: block size of the mask.
        causal: bottom-right causal masking (query i sees key j iff j <= i + shift).
        scale: softmax scale.
        preds: the in-tile token predicates (:class:`TokenPredicates`).
        key_bias: optional float ``[B|1, Hq|Hkv|1, Lk]`` added to the scaled scores of each key.

    Returns:
        o ``[B, Hq, Lq, D]`` in q's dtype, lse ``[B, Hq, Lq]`` float32 (float64 for float64 inputs).
        Rows that see no key give 0 and -inf; rows that see a non-finite key give NaN and NaN.
    """
    u = _Units(q, k, counts, indices, block_m, block_n, causal, scale, preds, key_bias)
    lse_dtype = accum_dtype(q.dtype)
    qu = u.rows(q)  # [R, G*bm, D]
    kf, vf = u.keys(k), u.keys(v)  # [B*Hkv*NKB, bn, D]
    step = u.step(2 * u.g_u * block_m * u.width * block_n + 2 * u.width * block_n * u.head_dim, chunk_bytes)
    outs, lses = [], []
    for r0 in range(0, u.n_rows, step):
        s, _, vg, keep, row_bad = u.scores(qu, kf, vf, r0, min(u.n_rows, r0 + step))
        o_c, lse_c = softmax_rows(s, vg)
        outs.append(o_c.masked_fill(row_bad[..., None], float("nan")))
        lses.append(lse_c.masked_fill(row_bad[..., None], float("nan")))
    o = torch.cat(outs) if outs else qu.new_zeros(qu.shape)
    lse = torch.cat(lses) if lses else qu.new_zeros((*qu.shape[:2], 1))
    return u.unrows(o).to(q.dtype), u.unrows(lse)[..., 0].to(lse_dtype)


def block_sparse_bwd_ref(do, q, k, v, o, lse, counts, indices, block_m, block_n, causal, scale, dlse=None,
                         chunk_bytes=CHUNK_BYTES, preds=NO_PREDICATES, key_bias=None):
    """Reference of :func:`block_sparse_bwd`: chunked and recompute-based, like the kernels.

    P is recomputed per chunk of units from ``lse``; ``dS = P * (dO V^T - delta)`` with
    ``delta = rowsum(dO * O) - dlse``, zero outside the mask. dK/dV of the gathered keys are
    scattered back with ``index_add_`` (deterministic on CPU; CUDA's ``index_add_`` on floats is not).
    Non-finite keys, queries and output gradients never reach a gradient through a pair that the
    mask excludes.

    Args:
        do: ``[B, Hq, Lq, D]``; q, k, v, counts, indices, block_m, block_n, causal, scale, preds: as in
            the forward. o, lse: the forward's outputs. dlse: optional gradient of lse ``[B, Hq, Lq]``.

    Returns:
        ``(dq, dk, dv)``, contiguous, in the dtypes of q, k, v. Rows that saw no key get zero dq. With
        ``key_bias`` also ``dbias`` shaped and typed like it.
    """
    u = _Units(q, k, counts, indices, block_m, block_n, causal, scale, preds, key_bias)
    delta = (do.to(u.cdt) * o.to(u.cdt)).sum(-1)  # [B, Hq, Lq]
    if dlse is not None:
        delta = delta - dlse.to(u.cdt)
    lse_c = torch.where(torch.isneginf(lse), float("inf"), lse).to(u.cdt)  # P = exp(s - inf) = 0 on empty rows
    qu, dou = u.rows(q), u.rows(do)  # [R, G*bm, D]
    q_safe = torch.where(torch.isfinite(qu), qu, 0.0)  # what dK reads of queries (excluded pairs weigh 0)
    do_safe = torch.where(torch.isfinite(dou), dou, 0.0)
    lse_u = u.rows(lse_c[..., None], value=float("inf"))  # [R, G*bm, 1]
    delta_u = u.rows(delta[..., None])  # [R, G*bm, 1]
    kf, vf = u.keys(k), u.keys(v)
    dkf = torch.zeros((kf.shape[0], block_n * u.head_dim), dtype=u.cdt, device=q.device)  # [B*Hkv*NKB, bn*D]
    dvf = torch.zeros_like(dkf)
    dbf = None if key_bias is None else torch.zeros_like(u.bias_blocks)  # [B*Hq*NKB, bn]
    step = u.step(5 * u.g_u * block_m * u.width * block_n + 4 * u.width * block_n * u.head_dim, chunk_bytes)
    dqs = []
    for r0 in range(0, u.n_rows, step):
        r1 = min(u.n_rows, r0 + step)
        s, kg, vg, keep, _ = u.scores(qu, kf, vf, r0, r1)  # [C, G*bm, W*bn]
        p = torch.exp(s - lse_u[r0:r1])
        dp = torch.bmm(dou[r0:r1], vg.transpose(1, 2))  # [C, G*bm, W*bn]
        ds = torch.where(keep, p * (dp - delta_u[r0:r1]), 0.0)
        p = torch.where(keep, p, 0.0)
        if dbf is not None:
            u.bias_grad(ds, r0, r1, dbf)
        dqs.append(torch.bmm(ds, kg) * scale)  # [C, G*bm, D]
        # scatter whole key blocks (rows of bn*D values): far faster than per-token rows
        blocks = u.flat[r0:r1].reshape(-1)  # [C*W]
        dkf.index_add_(0, blocks, (torch.bmm(ds.transpose(1, 2), q_safe[r0:r1]) * scale).reshape(blocks.shape[0], -1))
        dvf.index_add_(0, blocks, torch.bmm(p.transpose(1, 2), do_safe[r0:r1]).reshape(blocks.shape[0], -1))
    dq = u.unrows(torch.cat(dqs) if dqs else qu.new_zeros(qu.shape))
    kv_shape = (u.batch, u.n_kv_heads, u.n_kb * block_n, u.head_dim)
    dk = dkf.reshape(kv_shape)[:, :, :u.kv_len]
    dv = dvf.reshape(kv_shape)[:, :, :u.kv_len]
    grads = dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()
    if key_bias is None:
        return grads
    dbias = dbf.reshape(u.batch, u.n_q_heads, u.n_kb * block_n)[..., :u.kv_len]
    return grads + (reduce_bias_grad(dbias, key_bias).contiguous(),)


# ---- differentiable entry point: custom ops so torch.compile sees one node per pass ----
# the predicates travel flattened (kernels/_common/predicates.py: flat / unflat)
@torch.library.custom_op("sparse_attn::block_sparse_attn_fwd_ref", mutates_args=())
def _fwd_ref_op(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, block_m: int, block_n: int,
                causal: bool, scale: float, left: int, right: int, q_range: Optional[Tensor],
                kv_range: Optional[Tensor], q_segments: Optional[Tensor], kv_segments: Optional[Tensor],
                bit_slots: Optional[Tensor], bit_words: Optional[Tensor],
                bit_slots_t: Optional[Tensor], key_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    preds = unflat((left, right, q_range, kv_range, q_segments, kv_segments, bit_slots, bit_words, bit_slots_t))
    o, lse = block_sparse_fwd_ref(q, k, v, counts, indices, block_m, block_n, causal, scale, preds=preds,
                                  key_bias=key_bias)
    return o.contiguous(), lse.contiguous()


@_fwd_ref_op.register_fake
def _fwd_ref_fake(q, k, v, counts, indices, block_m, block_n, causal, scale, *rest, key_bias=None):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:3], dtype=accum_dtype(q.dtype), device=q.device))


@torch.library.custom_op("sparse_attn::block_sparse_attn_bwd_ref", mutates_args=())
def _bwd_ref_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Optional[Tensor],
                counts: Tensor, indices: Tensor, block_m: int, block_n: int, causal: bool,
                scale: float, left: int, right: int, q_range: Optional[Tensor],
                kv_range: Optional[Tensor], q_segments: Optional[Tensor], kv_segments: Optional[Tensor],
                bit_slots: Optional[Tensor], bit_words: Optional[Tensor], bit_slots_t: Optional[Tensor],
                key_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dbias)``; ``dbias`` is an empty tensor when there is no ``key_bias``."""
    preds = unflat((left, right, q_range, kv_range, q_segments, kv_segments, bit_slots, bit_words, bit_slots_t))
    grads = block_sparse_bwd_ref(do, q, k, v, o, lse, counts, indices, block_m, block_n, causal, scale, dlse=dlse,
                                 preds=preds, key_bias=key_bias)
    return grads if key_bias is not None else grads + (q.new_empty(0),)


@_bwd_ref_op.register_fake
def _bwd_ref_fake(do, q, k, v, o, lse, dlse, counts, indices, block_m, block_n, causal, scale, left, right,
                  q_range, kv_range, q_segments, kv_segments, bit_slots, bit_words, bit_slots_t, key_bias=None):
    dbias = q.new_empty(0) if key_bias is None else torch.empty_like(key_bias)
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)) + (dbias,)


register_backward("sparse_attn::block_sparse_attn_fwd_ref", torch.ops.sparse_attn.block_sparse_attn_bwd_ref,
                  bias_index=18)


def block_sparse_attn_ref(q, k, v, counts, indices, block_m, block_n, causal=False, scale=None,
                          preds=NO_PREDICATES, key_bias=None):
    """Differentiable block-sparse attention in plain PyTorch (any device; fp64 allowed).

    First-order gradients only (the backward is itself not differentiable).

    Args:
        preds: in-tile token predicates (:class:`~sparse_attn_kernels._common.predicates.TokenPredicates`).
        key_bias: optional float ``[B|1, Hq|Hkv|1, Lk]`` added to the scaled scores of each key (differentiable).

    Returns:
        ``(o, lse)`` as :func:`block_sparse_fwd_ref`; lse is differentiable too.

    Example:
        >>> o, lse = block_sparse_attn_ref(q, k, v, mask.counts, mask.indices, 64, 64, causal=True)
        >>> o.sum().backward()
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.sparse_attn.block_sparse_attn_fwd_ref(
        q, k, v, counts, indices, int(block_m), int(block_n), bool(causal), float(scale), *flat(preds), key_bias)
