"""Conversion of a BlockSparseMask to torch's FlexAttention ``BlockMask`` (same tiles, same lengths)."""

import torch

from .mask import BlockSparseMask


def to_flex_block_mask(mask: BlockSparseMask, causal: bool = False, num_heads=None):
    """The FlexAttention ``BlockMask`` that computes exactly what ``sparse_attention(..., mask, causal)`` does.

    Kept blocks become FlexAttention "full" blocks (compiled FlexAttention calls no ``mask_mod``
    on them). The ``mask_mod`` still states the whole predicate (block membership, and with
    ``causal`` also ``kv <= q + (Lk - Lq)``), because eager FlexAttention evaluates only the
    ``mask_mod`` and ignores the block lists. With ``causal``, blocks crossing the diagonal are
    partial and blocks entirely above it are dropped. ``num_heads`` (query heads) expands a
    mask given per key/value head, since FlexAttention wants 1 or Hq heads.

    Returns:
        ``BlockMask`` with ``BLOCK_SIZE = mask.block_size`` and ``seq_lengths = mask.seq_lens``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bm, bn = mask.block_size
    q_len, kv_len = mask.seq_lens
    n_qb, n_kb = mask.num_blocks
    keep = mask.to_block_dense()  # [Bm, Hm, NQB, NKB]
    if num_heads is not None and keep.shape[1] not in (1, num_heads):
        keep = keep.repeat_interleave(num_heads // keep.shape[1], dim=1)
    shift = kv_len - q_len
    n_b, n_h = keep.shape[:2]

    def in_block(b, h, q_idx, kv_idx):
        return keep[b % n_b, h % n_h, q_idx // bm, kv_idx // bn]

    if causal:
        q_first = torch.arange(n_qb, device=mask.device)[:, None] * bm
        q_last = torch.clamp(q_first + bm, max=q_len) - 1
        k_first = torch.arange(n_kb, device=mask.device)[None, :] * bn
        k_last = torch.clamp(k_first + bn, max=kv_len) - 1
        below = k_last <= q_first + shift  # every pair of the tile is visible
        touches = k_first <= q_last + shift  # some pair of the tile is visible
        full, part = keep & below, keep & touches & ~below

        def mask_mod(b, h, q_idx, kv_idx):
            return in_block(b, h, q_idx, kv_idx) & (kv_idx <= q_idx + shift)
    else:
        full, part, mask_mod = keep, torch.zeros_like(keep), in_block

    def lists(block_bool):
        counts = block_bool.sum(-1, dtype=torch.int32)
        order = torch.sort((~block_bool).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        return counts, order.contiguous()

    kv_num, kv_idx = lists(part)
    full_num, full_idx = lists(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bm, bn),
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len))
