"""Autograd wrapper and public kernel entry point for block-sparse attention (Triton)."""

import torch

from .fwd import block_sparse_fwd


class BlockSparseAttnFunction(torch.autograd.Function):
    """``(o, lse) = block_sparse_attn(q, k, v, counts, indices, block_m, block_n, causal, scale)``."""

    @staticmethod
    def forward(ctx, q, k, v, counts, indices, block_m, block_n, causal, scale):
        o, lse = block_sparse_fwd(q, k, v, counts, indices, block_m, block_n, causal, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        raise NotImplementedError(
            "the Triton block-sparse kernel has no backward pass yet; run sparse_attention(..., backend='torch') "
            "for gradients")


def block_sparse_attn(q, k, v, counts, indices, block_m, block_n, causal=False, scale=None):
    """Block-sparse attention with the Triton kernel.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``, unit last stride.
        counts: int32 ``[Bm, Hm, NQB]``; indices: int32 ``[Bm, Hm, NQB, W]`` (see docs/masks.md).

    Returns:
        ``(o, lse)``: ``[B, Hq, Lq, D]`` and float32 ``[B, Hq, Lq]``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return BlockSparseAttnFunction.apply(q, k, v, counts, indices, block_m, block_n, causal, float(scale))
