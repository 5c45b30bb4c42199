"""The autograd registration shared by the PyTorch paths' custom ops (the CPU path and the reference).

Both forwards take ``(q, k, v, counts, indices, block_m, block_n, causal, scale, left, right,
*predicate tensors)`` and return ``(o, lse)``; both backwards take ``(do, q, k, v, o, lse, dlse, counts,
indices, block_m, block_n, causal, scale, left, right, *predicate tensors)``.
"""

import torch


def register_backward(fwd_name: str, bwd_op, contiguous_grad: bool = False) -> None:
    """``torch.library.register_autograd`` of ``fwd_name`` with ``bwd_op`` as its backward (first-order)."""

    def setup_context(ctx, inputs, output):
        q, k, v, counts, indices, block_m, block_n, causal, scale, left, right, *pred_tensors = inputs
        ctx.save_for_backward(q, k, v, *output, counts, indices, *pred_tensors)
        ctx.n_inputs = len(inputs)
        ctx.config = (block_m, block_n, causal, scale, left, right)

    def backward(ctx, do, dlse):
        q, k, v, o, lse, counts, indices, *pred_tensors = ctx.saved_tensors
        dq, dk, dv = bwd_op(do.contiguous() if contiguous_grad else do, q, k, v, o, lse, dlse, counts, indices,
                            *ctx.config, *pred_tensors)
        return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
