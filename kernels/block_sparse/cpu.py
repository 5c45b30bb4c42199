"""Block-sparse attention for CPU tensors, built on PyTorch's fused CPU attention.

Each query block (with the query heads of its GQA group when they share the mask) gathers
only its kept key blocks and runs PyTorch's flash-style CPU attention on them, so no score
matrix is materialized and no elementwise pass over scores runs in Python.

The kept tiles of a row are split in two passes (``kernels/_common/predicates.py`` decides
which tile is which):

- **full** tiles (every pair attended): gathered and attended with no mask at all;
- **partial** tiles (the causal diagonal or a window edge, the ragged key tail, padding
  ranges, document boundaries, bit masks): gathered apart and attended with an additive mask
  built over those tiles only. Non-finite keys in them are zeroed first, so a key the mask
  excludes never reaches an output; a row that does see one gets NaN.

Tiles no pair of which is visible (above the causal diagonal, outside a window or a padding
range) are never gathered. Rows that have both kinds merge exactly by log-sum-exp. Rows of a
pass are grouped by their exact number of tiles, so gathered keys need no padding, and work is
chunked so that gathered K/V stay within a bounded buffer.

Same signature and outputs as :func:`sparse_attn_kernels.block_sparse.fwd.block_sparse_fwd`.
"""

from typing import Optional, Tuple

import torch

from .._common.predicates import NO_PREDICATES, band, classify_tiles, entries_keep, flat, unflat
from .._common.autograd import register_backward
from .._common.rows import BlockRows
from .._common.softmax import accum_dtype

CHUNK_BYTES = 8 * 1024 * 1024  # gathered K + V per chunk: small enough to stay in cache


def _flash_cpu():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def available() -> bool:
    """True when this torch build has the fused CPU attention this path runs on."""
    return _flash_cpu() is not None


def _compact(idx, keep, slots):
    """Per row, the entries of ``keep`` moved to the front in order: ``(idx [R, W], slots [R, W] | None, n [R])``."""
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
    return (torch.gather(idx, 1, order), None if slots is None else torch.gather(slots, 1, order),
            keep.sum(-1))


class _Rows(BlockRows):
    """Rows of the fused CPU path: :class:`BlockRows`, each row's full and partial tile lists, chunk plans."""

    def __init__(self, q, k, counts, indices, block_m, block_n, causal, preds):
        super().__init__(q, k, counts, indices, block_m, block_n, preds.bit_slots)
        self.preds = preds
        self.left, self.right = band(causal, preds.window)
        visible, full = classify_tiles(preds, self.left, self.right, self.b_of, self.m_of, self.idx, self.slots,
                                       block_m, block_n, self.q_len, self.kv_len)
        visible, full = visible & self.slot_ok, full & self.slot_ok
        self.full_idx, _, self.n_full = _compact(self.idx, full, None)
        self.part_idx, self.part_slots, self.n_part = _compact(self.idx, visible & ~full, self.slots)
        self.visible = visible
        self.tok_m = torch.arange(block_m, device=q.device).repeat(self.g_u)  # [G*bm]
        # partial tiles that only carry bits (no band, range or segment): the packed-words fast path
        no_ranges = preds.q_range is None and preds.kv_range is None and preds.q_segments is None
        self.bits_only = preds.bit_slots is not None and self.left < 0 and self.right < 0 and no_ranges
        # causality alone on an aligned grid: every partial tile is a diagonal tile whose pairs are
        # "key offset <= query offset" (top-left causal inside the tile), so no mask needs building
        shift = self.kv_len - self.q_len
        self.diagonal_only = (causal and self.left < 0 and self.right == 0 and no_ranges and
                              preds.bit_slots is None and block_m == block_n and shift % block_n == 0 and
                              self.q_len % block_m == 0 and self.kv_len % block_n == 0)

    def key_blocks(self, x):
        """[B, Hkv, Lk, D] -> [B*Hkv*NKB, bn*D] (zero padded): one gather row per block."""
        return super().key_blocks(x).reshape(-1, self.block_n * self.head_dim)

    def plan(self, n_tiles, cap, tag=None):
        """Chunks ``(rows, n)`` of the rows with ``n_tiles == n > 0``, at most ``max(cap, n)`` tiles each;
        with ``tag`` (bool ``[R]``) the chunks are ``(rows, n, t)``, rows of one chunk sharing ``t`` too."""
        key = n_tiles if tag is None else n_tiles * 2 + tag.long()
        order = torch.argsort(key, stable=True)
        runs, run_len = torch.unique_consecutive(key[order], return_counts=True)
        chunks, start = [], 0
        for kv, n_run in zip(runs.tolist(), run_len.tolist()):
            n = kv if tag is None else kv // 2
            if n > 0:
                step = max(1, cap // n)
                for a in range(start, start + n_run, step):
                    rows = order[a:min(start + n_run, a + step)]
                    chunks.append((rows, n) if tag is None else (rows, n, bool(kv % 2)))
            start += n_run
        return chunks

    def gather(self, blocks, rows, idx, n, out=None):
        """Key blocks ``idx[rows, :n]``: ``[C, 1, n*bn, D]`` (into ``out`` when given) and their flat indices."""
        flat_idx = (self.kv_base[rows, None] + idx[rows, :n]).reshape(-1)  # [C*n]
        if out is None:
            g = blocks.index_select(0, flat_idx)
        else:
            g = torch.index_select(blocks, 0, flat_idx, out=out[: flat_idx.numel()])
        return g.view(len(rows), 1, n * self.block_n, self.head_dim), flat_idx

    def partial_keep(self, rows, n):
        """bool ``[C, G*bm, n*bn]``: the pairs attended in the partial tiles of ``rows``, and ``[C, G*bm]`` the
        rows that see none of them."""
        slots = None if self.part_slots is None else self.part_slots[rows, :n]
        return entries_keep(self.preds, self.left, self.right, self.b_of[rows], self.m_of[rows],
                            self.part_idx[rows, :n], slots, self.tok_m, self.block_m, self.block_n,
                            self.q_len, self.kv_len, want_empty=True)


_BYTE_TABLES = {}


def _byte_table(dtype, device):
    """``[256, 8]`` additive values of the 8 bits of a byte: 0 where the bit is set, -inf elsewhere."""
    key = (dtype, str(device))
    if key not in _BYTE_TABLES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _BYTE_TABLES[key] = torch.where(bits.bool(), 0.0, float("-inf")).to(dtype=dtype, device=device)
    return _BYTE_TABLES[key]


def _bits_additive(r, rows, n, dtype, buf):
    """The additive mask ``[C, 1, G*bm, n*bn]`` and empty rows ``[C, G*bm]`` of bit-masked partial tiles with
    no closed-form predicate, straight from the packed words: one table lookup per byte writes the floats
    (no bool mask, no shifts over every pair)."""
    bm, bn = r.block_m, r.block_n
    slots = r.part_slots[rows, :n]  # [C, n]
    c = slots.shape[0]
    words = r.preds.bit_words
    n_words = words.shape[-1]
    flat = slots.reshape(-1).clamp(min=0)
    w = words.index_select(0, flat).view(c, n, bm, n_words)
    byte = w.view(torch.uint8).view(c, n, bm, 4 * n_words).permute(0, 2, 1, 3)  # [C, bm, n, 4*WORDS] (little end.)
    table = _byte_table(dtype, w.device)
    total = c * bm * n * 4 * n_words * 8
    out = buf[:total] if buf is not None and buf.numel() >= total else None
    vals = torch.index_select(table, 0, byte.reshape(-1).int(), out=None if out is None else out.view(-1, 8))
    add = vals.view(c, bm, n, 4 * n_words * 8)[..., :bn].reshape(c, bm, n * bn)
    none = slots < 0
    if bool(none.any()):  # entries without bits: the whole tile is kept
        add = add.masked_fill(none[:, None, :, None].expand(c, 1, n, bn).reshape(c, 1, n * bn), 0.0)
    empty = ~((w != 0).any(-1).any(1) | none.any(-1, keepdim=True))  # [C, bm]
    key_pos = (r.part_idx[rows, :n, None] * bn + torch.arange(bn, device=w.device)).reshape(c, 1, -1)
    if bool((key_pos >= r.kv_len).any()):  # the ragged key tail
        past = key_pos >= r.kv_len
        add = add.masked_fill(past, float("-inf"))
        empty = empty | torch.isinf(add).all(-1)
    if r.g_u > 1:  # GQA-packed rows: the bit rows of each head of the group
        add, empty = add[:, r.tok_m], empty[:, r.tok_m]
    return add.unsqueeze(1), empty


def _cap(block_n, head_dim, dtype, chunk_bytes):
    """K+V blocks gathered per chunk."""
    return max(1, chunk_bytes // (2 * block_n * head_dim * torch.empty((), dtype=dtype).element_size()))


def _additive(keep, dtype, buf=None):
    """[C, 1, M, N] additive mask: 0 where kept, -inf elsewhere (written into ``buf`` when given: a reused
    buffer costs no page faults)."""
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    ninf = torch.full((), float("-inf"), dtype=dtype, device=keep.device)
    if buf is None or buf.numel() < keep.numel():
        return torch.where(keep, zero, ninf).unsqueeze(1)
    out = buf[: keep.numel()].view(keep.shape)
    return torch.where(keep, zero, ninf, out=out).unsqueeze(1)


def _surely_finite(*xs) -> bool:
    """True when every value of ``xs`` is finite, by one fast reduction each: a sum is finite when every value
    is; a non-finite sum (NaN/Inf, or an overflow of large finite values) says False, and the caller runs
    its exact check."""
    return all(bool(torch.isfinite(x.sum(dtype=torch.float32))) for x in xs)


def _bad_keys(kb, vb, block_n):
    """bool ``[B*Hkv*NKB, bn]``: keys whose K or V holds a non-finite value, or None when all are finite
    (the common case costs one reduction per tensor)."""
    if _surely_finite(kb, vb):
        return None
    rows = kb.shape[0]
    return ~(torch.isfinite(kb.view(rows, block_n, -1)).all(-1) & torch.isfinite(vb.view(rows, block_n, -1)).all(-1))


def _clean(kg, vg, bad, flat_idx):
    """Gathered ``kg, vg [C, 1, N, D]`` with the non-finite keys (``bad`` rows of ``flat_idx``) zeroed, and
    those keys ``[C, N]`` (None when every key is finite)."""
    if bad is None:
        return kg, vg, None
    b = bad.index_select(0, flat_idx).view(kg.shape[0], -1)  # [C, N]
    return kg.masked_fill(b[:, None, :, None], 0.0), vg.masked_fill(b[:, None, :, None], 0.0), b


def _merge(o_acc, lse_acc, rows, o_c, lse_c):
    """Merge a partial result of ``rows`` into the accumulators by log-sum-exp (exact)."""
    o_old, lse_old = o_acc.index_select(0, rows), lse_acc.index_select(0, rows)
    lse = torch.logaddexp(lse_old, lse_c)
    lse_ref = torch.where(torch.isneginf(lse), 0.0, lse)
    w_old, w_new = torch.exp(lse_old - lse_ref), torch.exp(lse_c - lse_ref)  # [C, M]
    o = o_old * w_old[..., None] + o_c * w_new[..., None]
    o_acc.index_copy_(0, rows, o)
    lse_acc.index_copy_(0, rows, lse)


def _merge_or_store(o_acc, lse_acc, rows, o_c, lse_c, n_full):
    """Merge a partial-pass result into rows that also had full tiles; store it where they had none."""
    if bool((n_full.index_select(0, rows) > 0).any()):
        _merge(o_acc, lse_acc, rows, o_c, lse_c)
    else:  # no full tiles in these rows: nothing to merge with
        o_acc.index_copy_(0, rows, o_c)
        lse_acc.index_copy_(0, rows, lse_c)


_DIAGONAL_MASKS = {}


def _diagonal_masks(n, g, block, dtype, device):
    """``[1, 1, G*bm, n*bn]`` additive mask of a row whose last tile is its diagonal: 0 on the ``n - 1`` full
    tiles, top-left causal on the last (the same for every row of a chunk: broadcast over them). Built once
    per shape and kept (read only), as every layer of a model asks for the same few."""
    key = (n, g, block, dtype, str(device))
    if key not in _DIAGONAL_MASKS:
        if len(_DIAGONAL_MASKS) >= 256:  # bounded: long runs of odd shapes do not pile up
            _DIAGONAL_MASKS.clear()
        tri = torch.ones(block, block, dtype=torch.bool, device=device).tril()
        add = torch.zeros(g * block, n * block, dtype=dtype, device=device)
        add[:, (n - 1) * block:] = torch.where(tri, 0.0, float("-inf")).to(dtype).repeat(g, 1)
        _DIAGONAL_MASKS[key] = add.view(1, 1, g * block, n * block)
    return _DIAGONAL_MASKS[key]


def _fwd_one_pass(r, qr, kb, vb, scale, acc, cap, buf_k, buf_v):
    """Causality alone on an aligned grid (:attr:`_Rows.diagonal_only`) with finite K/V: each row gathers
    its visible tiles once (the diagonal tile is the last, as indices are sorted) and one fused call runs
    them under a mask shared by its chunk: no second pass, no merge."""
    flash = _flash_cpu()
    vis_idx, _, n_vis = _compact(r.idx, r.visible, None)
    if bool((n_vis > 0).all()):  # every row is written below
        o = torch.empty(qr.shape, dtype=acc, device=qr.device)
        lse = torch.empty(qr.shape[:2], dtype=acc, device=qr.device)
    else:  # rows that see no key stay o = 0, lse = -inf
        o = torch.zeros(qr.shape, dtype=acc, device=qr.device)
        lse = torch.full(qr.shape[:2], float("-inf"), dtype=acc, device=qr.device)
    for rows, n, diag in r.plan(n_vis, cap, tag=r.n_part > 0):
        kg, _ = r.gather(kb, rows, vis_idx, n, buf_k)  # [C, 1, n*bn, D]
        vg, _ = r.gather(vb, rows, vis_idx, n, buf_v)
        add = _diagonal_masks(n, r.g_u, r.block_m, qr.dtype, qr.device) if diag else None
        o_c, lse_c = flash(qr.index_select(0, rows).unsqueeze(1), kg, vg, attn_mask=add, scale=scale)
        o.index_copy_(0, rows, o_c.squeeze(1).to(acc))
        lse.index_copy_(0, rows, lse_c.squeeze(1).to(acc))
    return o, lse


@torch.no_grad()
def block_sparse_fwd_cpu(q, k, v, counts, indices, block_m, block_n, causal, scale, chunk_bytes=CHUNK_BYTES,
                         preds=NO_PREDICATES):
    """Block-sparse attention forward on CPU tensors (not differentiable by itself: see
    :func:`block_sparse_attn_cpu`).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        counts: int ``[Bm, Hm, NQB]``; indices: int ``[Bm, Hm, NQB, W]`` (sorted key blocks).
        block_m, block_n: the mask's block size (any positive ints).
        causal: bottom-right causal masking; scale: softmax scale.
        preds: in-tile token predicates (:class:`~sparse_attn_kernels._common.predicates.TokenPredicates`).

    Returns:
        ``(o, lse)``: o ``[B, Hq, Lq, D]`` in q's dtype (0 on rows that see no key), lse float32
        ``[B, Hq, Lq]`` (float64 for float64 inputs; -inf on rows that see no key). Rows that see a
        non-finite key give NaN in both.
    """
    flash = _flash_cpu()
    r = _Rows(q, k, counts, indices, block_m, block_n, causal, preds)
    qr = r.gather_queries(q)  # [R, G*bm, D]
    kb, vb = r.key_blocks(k), r.key_blocks(v)  # [B*Hkv*NKB, bn*D]
    acc = accum_dtype(q.dtype)
    cap = _cap(block_n, r.head_dim, q.dtype, chunk_bytes)
    n_buf = max(cap, r.width)  # one reused gather buffer: no page faults for every chunk
    buf_k, buf_v = kb.new_empty((n_buf, kb.shape[1])), vb.new_empty((n_buf, vb.shape[1]))
    if r.diagonal_only and _surely_finite(kb, vb):
        o, lse = _fwd_one_pass(r, qr, kb, vb, scale, acc, cap, buf_k, buf_v)
        return r.scatter_rows(o.to(q.dtype)), r.scatter_rows(lse)
    o = torch.zeros(qr.shape, dtype=acc, device=q.device)  # rows that see no key stay 0
    lse = torch.full(qr.shape[:2], float("-inf"), dtype=acc, device=q.device)
    # -- full tiles: no mask; each row appears in at most one chunk, so results are stored directly ----
    for rows, n in r.plan(r.n_full, cap):
        kg, _ = r.gather(kb, rows, r.full_idx, n, buf_k)  # [C, 1, n*bn, D]
        vg, _ = r.gather(vb, rows, r.full_idx, n, buf_v)
        o_c, lse_c = flash(qr.index_select(0, rows).unsqueeze(1), kg, vg, scale=scale)
        o.index_copy_(0, rows, o_c.squeeze(1).to(acc))
        lse.index_copy_(0, rows, lse_c.squeeze(1).to(acc))
    # -- partial tiles: additive mask over these tiles only, merged into the full part ----
    bad_rows = torch.zeros(qr.shape[:2], dtype=torch.bool, device=q.device)
    bad_keys = _bad_keys(kb, vb, block_n) if r.n_part.any() else None
    add_buf = torch.empty(n_buf * max(block_n, 32 * -(-block_n // 32)) * block_m * r.g_u, dtype=q.dtype,
                          device=q.device)
    for rows, n in r.plan(r.n_part, cap):
        kg, flat_idx = r.gather(kb, rows, r.part_idx, n, buf_k)
        vg, _ = r.gather(vb, rows, r.part_idx, n, buf_v)
        kg, vg, bad = _clean(kg, vg, bad_keys, flat_idx)
        if r.bits_only:
            add, empty = _bits_additive(r, rows, n, q.dtype, add_buf)
            keep = add[:, 0] == 0 if bad is not None else None
        else:
            keep, empty = r.partial_keep(rows, n)  # [C, G*bm, n*bn], [C, G*bm]
            add = _additive(keep, q.dtype, add_buf)
        o_c, lse_c = flash(qr.index_select(0, rows).unsqueeze(1), kg, vg, attn_mask=add, scale=scale)
        o_c = o_c.squeeze(1).to(acc).masked_fill(empty[..., None], 0.0)
        lse_c = lse_c.squeeze(1).to(acc).masked_fill(empty, float("-inf"))
        _merge_or_store(o, lse, rows, o_c, lse_c, r.n_full)
        if bad is not None:
            bad_rows.index_copy_(0, rows, bad_rows.index_select(0, rows) | (keep & bad[:, None]).any(-1))
    if bad_keys is not None and bool(bad_rows.any()):
        o.masked_fill_(bad_rows[..., None], float("nan"))
        lse.masked_fill_(bad_rows, float("nan"))
    return r.scatter_rows(o.to(q.dtype)), r.scatter_rows(lse)


@torch.no_grad()
def block_sparse_bwd_cpu(do, q, k, v, o, lse, counts, indices, block_m, block_n, causal, scale,
                         chunk_bytes=CHUNK_BYTES, preds=NO_PREDICATES):
    """Gradients of :func:`block_sparse_fwd_cpu` (through ``o``; not through ``lse``).

    Each chunk of rows runs PyTorch's fused CPU attention backward on its gathered blocks, with the
    total ``o`` and ``lse`` of the row (so the full and the partial pass each give their exact share);
    dK/dV of the gathered blocks are summed back with ``index_add_`` (deterministic on CPU). Rows whose
    output, query or output gradient is not finite contribute nothing to dK/dV; their dq is NaN.

    Returns:
        ``(dq, dk, dv)`` in the dtypes and shapes of q, k, v; rows that saw no key get dq = 0.
    """
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    r = _Rows(q, k, counts, indices, block_m, block_n, causal, preds)
    qr, dor, orr = r.gather_queries(q), r.gather_queries(do), r.gather_queries(o)  # [R, G*bm, D]
    lser = r.gather_queries(lse.unsqueeze(-1)).squeeze(-1)  # [R, G*bm]
    bad_rows = None
    if not _surely_finite(qr, dor, orr) or bool(lser.isnan().any()):  # cheap test before the exact per-row one
        ok = torch.isfinite(qr).all(-1) & torch.isfinite(dor).all(-1) & torch.isfinite(orr).all(-1) \
            & ~torch.isnan(lser)  # [R, G*bm]
        bad_rows = ~ok & ~torch.isneginf(lser)
        qr, dor, orr = (x.masked_fill(~ok[..., None], 0.0) for x in (qr, dor, orr))
        lser = lser.masked_fill(~ok, 0.0)
    lser = lser.masked_fill(torch.isneginf(lser), 0.0)  # empty rows: exp(-inf - 0) = 0
    kb, vb = r.key_blocks(k), r.key_blocks(v)  # [B*Hkv*NKB, bn*D]
    acc = accum_dtype(q.dtype)
    dkb = torch.zeros(kb.shape, dtype=acc, device=q.device)
    dvb = torch.zeros(vb.shape, dtype=acc, device=q.device)
    dqr = torch.zeros(qr.shape, dtype=acc, device=q.device)
    cap = _cap(block_n, r.head_dim, q.dtype, chunk_bytes)
    bad_keys = _bad_keys(kb, vb, block_n) if r.n_part.any() else None
    for part in (False, True):
        idx, n_tiles = (r.part_idx, r.n_part) if part else (r.full_idx, r.n_full)
        for rows, n in r.plan(n_tiles, cap):
            kg, flat_idx = r.gather(kb, rows, idx, n)
            vg, _ = r.gather(vb, rows, idx, n)
            add = None
            if part:
                kg, vg, _ = _clean(kg, vg, bad_keys, flat_idx)
                add = _additive(r.partial_keep(rows, n)[0], q.dtype)
            pick = lambda x: x.index_select(0, rows).unsqueeze(1)  # noqa: E731  [C, 1, G*bm, ...]
            dq_c, dk_c, dv_c = flash_bwd(pick(dor), pick(qr), kg, vg, pick(orr), pick(lser).to(acc), 0.0, False,
                                         attn_mask=add, scale=scale)
            dqr.index_add_(0, rows, dq_c.squeeze(1).to(acc))
            dkb.index_add_(0, flat_idx, dk_c.reshape(len(flat_idx), -1).to(acc))
            dvb.index_add_(0, flat_idx, dv_c.reshape(len(flat_idx), -1).to(acc))
    if bad_rows is not None:
        dqr.masked_fill_(bad_rows[..., None], float("nan"))
    dq = r.scatter_rows(dqr).to(q.dtype).contiguous()
    kv_shape = (r.batch, r.n_kv_heads, r.n_kb * block_n, r.head_dim)
    dk = dkb.reshape(kv_shape)[:, :, : r.kv_len].to(k.dtype).contiguous()
    dv = dvb.reshape(kv_shape)[:, :, : r.kv_len].to(v.dtype).contiguous()
    return dq, dk, dv


# ---- differentiable entry point: custom ops, so torch.compile sees one node per pass ----
# the predicates travel flattened (kernels/_common/predicates.py: flat / unflat)
Tensor = torch.Tensor


@torch.library.custom_op("sparse_attn::block_sparse_attn_fwd_cpu", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, block_m: int, block_n: int,
            causal: bool, scale: float, left: int, right: int, q_range: Optional[Tensor],
            kv_range: Optional[Tensor], q_segments: Optional[Tensor], kv_segments: Optional[Tensor],
            bit_slots: Optional[Tensor], bit_words: Optional[Tensor],
            bit_slots_t: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    preds = unflat((left, right, q_range, kv_range, q_segments, kv_segments, bit_slots, bit_words, bit_slots_t))
    o, lse = block_sparse_fwd_cpu(q, k, v, counts, indices, block_m, block_n, causal, scale, preds=preds)
    return o.contiguous(), lse.contiguous()


@_fwd_op.register_fake
def _fwd_fake(q, k, v, counts, indices, block_m, block_n, causal, scale, *preds):
    lse_dtype = accum_dtype(q.dtype)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("sparse_attn::block_sparse_attn_bwd_cpu", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Optional[Tensor],
            counts: Tensor, indices: Tensor, block_m: int, block_n: int, causal: bool,
            scale: float, left: int, right: int, q_range: Optional[Tensor],
            kv_range: Optional[Tensor], q_segments: Optional[Tensor], kv_segments: Optional[Tensor],
            bit_slots: Optional[Tensor], bit_words: Optional[Tensor],
            bit_slots_t: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    if dlse is not None and bool((dlse != 0).any()):
        raise ValueError("the CPU path does not differentiate through lse; sparse_attention routes "
                         "return_lse=True with gradients to the reference path instead")
    preds = unflat((left, right, q_range, kv_range, q_segments, kv_segments, bit_slots, bit_words, bit_slots_t))
    return block_sparse_bwd_cpu(do, q, k, v, o, lse, counts, indices, block_m, block_n, causal, scale, preds=preds)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, dlse, counts, indices, block_m, block_n, causal, scale, *preds):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


register_backward("sparse_attn::block_sparse_attn_fwd_cpu", torch.ops.sparse_attn.block_sparse_attn_bwd_cpu,
                  contiguous_grad=True)


def block_sparse_attn_cpu(q, k, v, counts, indices, block_m, block_n, causal=False, scale=None,
                          preds=NO_PREDICATES):
    """Differentiable block-sparse attention on CPU tensors (gradients through ``o``).

    Returns:
        ``(o, lse)`` as :func:`block_sparse_fwd_cpu`.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.sparse_attn.block_sparse_attn_fwd_cpu(
        q, k, v, counts, indices, int(block_m), int(block_n), bool(causal), float(scale), *flat(preds))
