"""``stripe_attention``: validation and dispatch for :class:`StripeSparseMask` (Triton kernel or PyTorch path).

``sparse_attention(q, k, v, mask)`` forwards here when ``mask`` is a :class:`StripeSparseMask`.
"""

import torch

from sparse_attn_kernels.reference_stripe import stripe_sparse_fwd_ref

from ._checks import check_bool, check_mask_fits, check_qkv, check_scale, empty_attention, resolve_backend
from .stripe_mask import StripeSparseMask

def _check_mask(mask, q, k):
    if not isinstance(mask, StripeSparseMask):
        raise TypeError(f"mask must be a StripeSparseMask, got {type(mask).__name__}.")
    check_mask_fits(mask, q, k)


def stripe_attention(q, k, v, mask, *, causal=False, scale=None, return_lse=False, backend="auto"):
    """Attention over the vertical columns and slash diagonals of ``mask``, exact at token level.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA without repeating K/V).
        mask: :class:`StripeSparseMask` built for ``(Lq, Lk)``; heads 1, Hkv or Hq; batch 1 or B.
        causal: AND the bottom-right causal predicate ``j <= i + (Lk - Lq)`` into the mask.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log; -inf on empty rows).
        backend: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``. Both paths
            are differentiable; the Triton backward is deterministic (no atomics).

    Returns:
        ``o`` ``[B, Hq, Lq, D]`` in q's dtype (rows that see no key are 0), and ``lse`` when asked.

    Example:
        >>> q = k = v = torch.randn(1, 2, 100, 32)
        >>> mask = StripeSparseMask.from_vertical_slash(torch.tensor([[[0]]]), torch.tensor([[[0, 1, 2]]]),
        ...                                             seq_lens=(100, 100), block_size=32)
        >>> stripe_attention(q, k, v, mask, causal=True).shape
        torch.Size([1, 2, 100, 32])
    """
    check_bool(causal, "causal")
    check_bool(return_lse, "return_lse")
    check_qkv(q, k, v, backend)
    _check_mask(mask, q, k)
    backend = resolve_backend(backend, q, mask.block_size)
    scale = check_scale(scale, q)
    if q.shape[0] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        o, lse = empty_attention(q, k, v)
        return (o, lse) if return_lse else o
    lowered = (mask.block_counts, mask.block_indices, mask.block_full, mask.col_counts, mask.col_indices,
               mask.diag_keep, mask.col_keep)
    bm, bn = mask.block_size
    if backend == "triton":
        from sparse_attn_kernels.stripe_sparse.op import stripe_sparse_attn

        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        bwd_lists = (*mask.kv_major(), mask.vertical, mask.vertical_count) if needs_grad else None
        o, lse = stripe_sparse_attn(q, k, v, lowered, bwd_lists, bm, bn, bool(causal), float(scale))
    else:
        o, lse = stripe_sparse_fwd_ref(q, k, v, *lowered, bm, bn, bool(causal), float(scale))
        lse = lse.float()
    return (o, lse) if return_lse else o
