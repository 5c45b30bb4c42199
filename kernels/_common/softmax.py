"""Pieces shared by the PyTorch attention paths (reference twins and the CPU path)."""

import torch


def accum_dtype(dtype):
    """Accumulation and log-sum-exp dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_rows(s, v):
    """Softmax attention of masked scores ``s [N, M, K]`` (``-inf`` = not kept) over ``v [N, K, D]``.

    Returns ``(o [N, M, D], lse [N, M, 1])``; rows with no kept key give ``o = 0`` and ``lse = -inf``;
    a NaN row keeps NaN in both (never a silent ``-inf`` that a merge by LSE would drop).
    """
    m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_full(s.shape[:-1] + (1,), float("-inf"))
    m_ref = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m_ref)
    l_sum = p.sum(dim=-1, keepdim=True)
    empty = l_sum == 0
    l_safe = torch.where(empty, torch.ones_like(l_sum), l_sum)
    lse = torch.where(empty, torch.full_like(l_safe, float("-inf")), m_ref + torch.log(l_safe))
    return torch.bmm(p, v) / l_safe, lse
