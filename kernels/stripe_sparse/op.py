"""Autograd wrapper and public kernel entry point for stripe-sparse attention (Triton)."""

import torch

from .fwd import stripe_sparse_fwd


class StripeSparseAttnFunction(torch.autograd.Function):
    """``(o, lse) = stripe_sparse_attn(q, k, v, lowered, bwd_lists, block_m, block_n, causal, scale)``.

    ``lowered`` is the tuple of the mask's kernel tensors; ``bwd_lists`` is ``(counts_t, indices_t,
    vertical, vertical_count)`` (the block part transposed, and the sorted unique columns), needed
    only when a gradient is asked for.
    """

    @staticmethod
    def forward(ctx, q, k, v, lowered, bwd_lists, block_m, block_n, causal, scale):
        o, lse = stripe_sparse_fwd(q, k, v, *lowered, block_m, block_n, causal, scale)
        ctx.mark_non_differentiable(lse)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, o, lse)
            ctx.lowered, ctx.bwd_lists = lowered, bwd_lists
            ctx.args = (block_m, block_n, causal, scale)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        from .bwd import stripe_sparse_bwd

        if ctx.bwd_lists is None:
            raise ValueError("the backward needs bwd_lists=(counts_t, indices_t, vertical, vertical_count); "
                             "stripe_attention passes them when q, k or v requires grad.")
        q, k, v, o, lse = ctx.saved_tensors
        counts_t, indices_t, vertical, vertical_count = ctx.bwd_lists
        dq, dk, dv = stripe_sparse_bwd(do, q, k, v, o, lse, ctx.lowered, (counts_t, indices_t), vertical,
                                       vertical_count, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def stripe_sparse_attn(q, k, v, lowered, bwd_lists=None, block_m=64, block_n=64, causal=False, scale=None):
    """Stripe-sparse attention with the Triton kernels (forward and backward).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``, unit last stride.
        lowered: ``(block_counts, block_indices, block_full, col_counts, col_indices, diag_keep, col_keep)``
            of a ``StripeSparseMask`` (see docs/masks.md, StripeSparseMask).
        bwd_lists: ``(counts_t, indices_t, vertical, vertical_count)``, required for gradients.
        block_m, block_n: the mask's block size.

    Returns:
        ``(o, lse)``: ``[B, Hq, Lq, D]`` and float32 ``[B, Hq, Lq]``.

    Example:
        >>> o, lse = stripe_sparse_attn(q, k, v, lowered, None, 64, 64, causal=True)  # doctest: +SKIP
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return StripeSparseAttnFunction.apply(q, k, v, tuple(lowered), bwd_lists, block_m, block_n, bool(causal),
                                          float(scale))
