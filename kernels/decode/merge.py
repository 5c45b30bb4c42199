"""Merge of partial attentions over disjoint key sets by their log-sum-exp (the split-K epilogue)."""

import torch


def merge_splits(o_part, lse_part):
    """Combine ``S`` partial results over disjoint key ranges into one.

    Args:
        o_part: float32 ``[..., S, R, D]``, each split normalized over its own keys.
        lse_part: float32 ``[..., S, R]`` natural-log LSE of each split (``-inf``: the split saw no key).

    Returns:
        ``(o [..., R, D], lse [..., R])``: rows no split saw give ``o = 0`` and ``lse = -inf``; a NaN in
        any split's row keeps NaN in that row (a merge never drops it).
    """
    m = lse_part.amax(dim=-2, keepdim=True)  # [..., 1, R]
    m_ref = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w = torch.exp(lse_part - m_ref)  # [..., S, R]; 0 for empty splits
    total = w.sum(dim=-2)  # [..., R]
    nan_row = torch.isnan(lse_part).any(dim=-2)  # [..., R]
    empty = (total == 0) & ~nan_row
    safe = torch.where(empty, torch.ones_like(total), total)
    # empty splits hold o = 0; weight 0 keeps them out without touching their values
    o = (o_part * w.unsqueeze(-1)).sum(dim=-3) / safe.unsqueeze(-1)  # [..., R, D]
    lse = torch.where(empty, torch.full_like(total, float("-inf")), m_ref.squeeze(-2) + torch.log(safe))
    o = torch.where(nan_row.unsqueeze(-1), torch.full_like(o, float("nan")), o)
    lse = torch.where(nan_row, torch.full_like(lse, float("nan")), lse)
    return o, lse
