"""``stripe_attention``: validation and dispatch for :class:`StripeSparseMask` (Triton kernel or PyTorch path).

``sparse_attention(q, k, v, mask)`` forwards here when ``mask`` is a :class:`StripeSparseMask`.
"""

import os

import torch

from sparse_attn_kernels.reference_stripe import stripe_sparse_fwd_ref

from ._checks import check_tensor
from .stripe_mask import StripeSparseMask

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_BLOCKS = (16, 32, 64, 128)
_TRITON_HEAD_DIMS = (16, 256)
_BACKENDS = ("auto", "triton", "torch")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_qkv(q, k, v, backend):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name)
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, L, D] (rank 4), got {list(x.shape)}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}.")
    allowed = _FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if q.dtype not in allowed:
        raise TypeError(f"q must have dtype in {[str(d) for d in allowed]} for backend={backend!r}, got {q.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Lk, D], got {list(k.shape)} and {list(v.shape)}.")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have batch {q.shape[0]} and head dim {q.shape[3]} like q, got shape "
                         f"{list(k.shape)}.")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}).")


def _check_mask(mask, q, k):
    if not isinstance(mask, StripeSparseMask):
        raise TypeError(f"mask must be a StripeSparseMask, got {type(mask).__name__}.")
    if mask.seq_lens != (q.shape[2], k.shape[2]):
        raise ValueError(f"mask was built for seq_lens={mask.seq_lens}, but q and k have lengths "
                         f"({q.shape[2]}, {k.shape[2]}).")
    mb, mh = mask.batch_heads
    if mb not in (1, q.shape[0]):
        raise ValueError(f"mask batch must be 1 or {q.shape[0]}, got {mb}.")
    if mh not in (1, k.shape[1], q.shape[1]):
        raise ValueError(f"mask heads must be 1, {k.shape[1]} (kv heads) or {q.shape[1]} (query heads), got {mh}.")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device}, but q is on {q.device}; use mask.to(q.device).")


def _resolve_backend(backend, q, mask):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        if not (q.is_cuda or _interpreting()):
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}.")
        if not _TRITON_HEAD_DIMS[0] <= q.shape[-1] <= _TRITON_HEAD_DIMS[1]:
            raise ValueError(f"head dim must be in [16, 256] for the Triton kernel, got {q.shape[-1]}.")
        if any(b not in _TRITON_BLOCKS for b in mask.block_size):
            raise ValueError(f"mask.block_size must use sizes in {_TRITON_BLOCKS} for the Triton kernel, "
                             f"got {mask.block_size}.")
    return backend


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
    _check_qkv(q, k, v, backend)
    _check_mask(mask, q, k)
    backend = _resolve_backend(backend, q, mask)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}.")
    batch, n_q_heads, q_len, _ = q.shape
    if batch == 0 or q_len == 0 or k.shape[2] == 0:
        # zeros attached to q, k, v (an empty sum is exactly 0): a backward gives zero gradients
        o = q.new_zeros(q.shape) + (q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum())
        lse = torch.full((batch, n_q_heads, q_len), float("-inf"), dtype=torch.float32, device=q.device)
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
