"""The autograd registration shared by the PyTorch paths' custom ops (the CPU path and the reference).

Both forwards take ``(q, k, v, counts, indices, block_m, block_n, causal, scale, left, right,
*predicate tensors)`` and return ``(o, lse)``; both backwards take ``(do, q, k, v, o, lse, dlse, counts,
indices, block_m, block_n, causal, scale, left, right, *predicate tensors)``.
"""

import torch


def register_backward(fwd_name: str, bwd_op, contiguous_grad: bool = False, bias_index=None) -> None:
    """``torch.library.register_autograd`` of ``fwd_name`` with ``bwd_op`` as its backward (first-order).

    With ``bias_index`` the forward takes an optional ``key_bias`` input at that position (its last, which
    the dispatcher may leave out when it is None); ``bwd_op`` then takes it last and returns
    ``(dq, dk, dv, dbias)``.
    """
    with_bias = bias_index is not None

    def setup_context(ctx, inputs, output):
        key_bias = inputs[bias_index] if with_bias and len(inputs) > bias_index else None
        inputs_ = inputs[:bias_index] if with_bias else inputs
        q, k, v, counts, indices, block_m, block_n, causal, scale, left, right, *pred_tensors = inputs_
        ctx.save_for_backward(q, k, v, *output, counts, indices, key_bias, *pred_tensors)
        ctx.n_inputs = len(inputs)
        ctx.config = (block_m, block_n, causal, scale, left, right)

    def backward(ctx, do, dlse):
        q, k, v, o, lse, counts, indices, key_bias, *pred_tensors = ctx.saved_tensors
        extra = (key_bias,) if with_bias else ()
        grads = bwd_op(do.contiguous() if contiguous_grad else do, q, k, v, o, lse, dlse, counts, indices,
                       *ctx.config, *pred_tensors, *extra)
        out = tuple(grads[:3]) + (None,) * (ctx.n_inputs - 3)
        if key_bias is not None:
            out = out[:bias_index] + (grads[3],)
        return out

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
