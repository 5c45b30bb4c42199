"""Conversion of a BlockSparseMask to torch's FlexAttention ``BlockMask`` (same tiles, same lengths)."""

import torch

from .mask import BlockSparseMask


def to_flex_block_mask(mask: BlockSparseMask, causal: bool = False):
    """The FlexAttention ``BlockMask`` that computes exactly what ``sparse_attention(..., mask, causal)`` does.

    Kept blocks become FlexAttention "full" blocks (no ``mask_mod`` call). With ``causal``
    the predicate ``kv <= q + (Lk - Lq)`` is the ``mask_mod``; blocks crossing the diagonal
    become partial blocks and blocks entirely above it are dropped.

    Returns:
        ``BlockMask`` with ``BLOCK_SIZE = mask.block_size`` and ``seq_lengths = mask.seq_lens``.
    """
    from torch.nn.attention.flex_attention import BlockMask, noop_mask

    bm, bn = mask.block_size
    q_len, kv_len = mask.seq_lens
    n_qb, n_kb = mask.num_blocks
    keep = mask.to_block_dense()  # [Bm, Hm, NQB, NKB]
    shift = kv_len - q_len
    if causal:
        q_first = torch.arange(n_qb, device=mask.device)[:, None] * bm
        q_last = torch.clamp(q_first + bm, max=q_len) - 1
        k_first = torch.arange(n_kb, device=mask.device)[None, :] * bn
        k_last = torch.clamp(k_first + bn, max=kv_len) - 1
        below = k_last <= q_first + shift  # every pair of the tile is visible
        touches = k_first <= q_last + shift  # some pair of the tile is visible
        full, part = keep & below, keep & touches & ~below

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + shift
    else:
        full, part, mask_mod = keep, torch.zeros_like(keep), noop_mask

    def lists(block_bool):
        counts = block_bool.sum(-1, dtype=torch.int32)
        order = torch.sort((~block_bool).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        return counts, order.contiguous()

    kv_num, kv_idx = lists(part)
    full_num, full_idx = lists(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bm, bn),
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len))
