"""Conversion of a BlockSparseMask to torch's FlexAttention ``BlockMask`` (same pairs, same lengths)."""

import torch

from sparse_attn_kernels._common.predicates import ranges_of, shift_of

from .mask import BlockSparseMask


def _head_map(mask: BlockSparseMask, num_heads):
    """Mask head of each query head, as the package maps them (``h``, ``h // group`` or 0)."""
    hm = mask.batch_heads[1]
    if hm == 1:
        return None
    if num_heads is None:
        raise ValueError(f"num_heads (the number of query heads) is required for a mask with {hm} heads: "
                         f"FlexAttention wants 1 or Hq heads, and a mask given per key/value head maps query head "
                         f"h to mask head h // (Hq // Hkv).")
    if num_heads % hm:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of the mask's {hm} heads.")
    return torch.arange(num_heads, device=mask.device) // (num_heads // hm)


def to_flex_block_mask(mask: BlockSparseMask, causal: bool = False, num_heads=None):
    """The FlexAttention ``BlockMask`` that computes exactly what ``sparse_attention(..., mask, causal)`` does.

    Full tiles (no pair of them masked, ``causal`` included) become FlexAttention "full" blocks
    (compiled FlexAttention calls no ``mask_mod`` on them); partial tiles (the causal diagonal, window
    and padding edges, segment boundaries, bit-masked tiles, the ragged tail) become partial blocks;
    tiles with no visible pair are dropped. The ``mask_mod`` states the whole token predicate, because
    eager FlexAttention evaluates only the ``mask_mod``.

    Args:
        num_heads: query heads; required when the mask has more than one head (FlexAttention wants 1 or
            Hq heads; a per-KV-head mask is expanded as the package maps heads, ``h // (Hq // Hkv)``).

    Returns:
        ``BlockMask`` with ``BLOCK_SIZE = mask.block_size``, ``seq_lengths = mask.seq_lens``, batch
        ``max(Bm, predicate batch)``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a BlockSparseMask, got {type(mask).__name__}.")
    bm, bn = mask.block_size
    q_len, kv_len = mask.seq_lens
    n_qb, n_kb = mask.num_blocks
    heads = _head_map(mask, num_heads)
    n_b = max(mask.batch_heads[0], mask.predicate_batch)
    b_of, m_of, kb, _, visible, full, (preds, left, right, _, hm) = mask._rows(causal)

    def dense(sel):  # [R, W] entries -> bool [B', Hm, NQB, NKB]
        out = torch.zeros((n_b * hm * n_qb, n_kb + 1), dtype=torch.bool, device=mask.device)
        out.scatter_(1, torch.where(sel, kb, n_kb), True)
        out = out[:, :n_kb].view(n_b, hm, n_qb, n_kb)
        return out if heads is None else out.index_select(1, heads)

    full_map, part_map = dense(full), dense(visible & ~full)
    keep_tiles = mask.to_block_dense()  # [Bm, Hm, NQB, NKB]
    slot_tiles = None
    if mask.has_bits:
        slot_tiles = mask.slot_map()  # [Bm, Hm, NQB, NKB]
        words = mask.bit_words.long()
    mb = mask.batch_heads[0]
    rows = torch.arange(n_b, device=mask.device)
    q_rng, kv_rng = ranges_of(preds.q_range, rows, q_len), ranges_of(preds.kv_range, rows, kv_len)  # [B', 2]
    shifts = shift_of(preds, rows, q_len, kv_len)  # [B']
    q_seg, kv_seg = preds.q_segments, preds.kv_segments
    head_of = heads if heads is not None else torch.zeros(1, dtype=torch.long, device=mask.device)

    def mask_mod(b, h, q_idx, kv_idx):
        bb = b % mb
        hh = head_of[h % head_of.numel()] if heads is not None else h * 0
        qb, kb_ = q_idx // bm, kv_idx // bn
        keep = keep_tiles[bb, hh, qb, kb_] & (kv_idx < kv_len) & (q_idx < q_len)
        if slot_tiles is not None:
            s = slot_tiles[bb, hh, qb, kb_]
            col = kv_idx % bn
            word = words[s.clamp(min=0), q_idx % bm, col // 32]
            keep = keep & ((s < 0) | (((word >> (col % 32)) & 1) != 0))
        bp = b % n_b
        qr, kr, shift = q_rng[bp], kv_rng[bp], shifts[bp]
        keep = keep & (q_idx >= qr[0]) & (q_idx < qr[1]) & (kv_idx >= kr[0]) & (kv_idx < kr[1])
        d = kv_idx - q_idx - shift
        if left >= 0:
            keep = keep & (d >= -left)
        if right >= 0:
            keep = keep & (d <= right)
        if q_seg is not None:
            keep = keep & (q_seg[b % q_seg.shape[0], q_idx] == kv_seg[b % kv_seg.shape[0], kv_idx])
        return keep

    def lists(block_bool):
        counts = block_bool.sum(-1, dtype=torch.int32)
        order = torch.sort((~block_bool).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        return counts, order.contiguous()

    kv_num, kv_idx = lists(part_map)
    full_num, full_idx = lists(full_map)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bm, bn),
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len))
