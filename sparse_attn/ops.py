"""``sparse_attention``: validation and dispatch to the Triton kernel or the PyTorch path."""

import torch

from sparse_attn_kernels.block_sparse.cpu import available as cpu_path_available
from sparse_attn_kernels.block_sparse.cpu import block_sparse_attn_cpu
from sparse_attn_kernels.reference import block_sparse_attn_ref

from ._checks import check_mask_fits, check_qkv, check_scale, empty_attention, resolve_backend
from .mask import BlockSparseMask
from .stripe_mask import StripeSparseMask
from .stripe_ops import stripe_attention
from .permuted import PermutedMask, permuted_attention
from .routed import RoutedMask, routed_attention
from .head_groups import HeadGroupsMask, head_groups_attention

DENSE_BLOCK = 64


def _check_mask(mask, q, k):
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a BlockSparseMask or None, got {type(mask).__name__}.")
    check_mask_fits(mask, q, k)


def sparse_attention(q, k, v, mask=None, *, causal=False, scale=None, return_lse=False, backend="auto"):
    """Attention restricted to the tiles of ``mask``, exact inside them.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA without repeating K/V).
        mask: :class:`BlockSparseMask` for ``(Lq, Lk)``, or None for dense attention;
            a :class:`StripeSparseMask` goes to :func:`stripe_attention` and a :class:`PermutedMask`
            (non-causal) to :func:`permuted_attention`, a :class:`~sparse_attn.RoutedMask` to
            :func:`~sparse_attn.routed_attention`, a :class:`~sparse_attn.head_groups.HeadGroupsMask` to
            :func:`~sparse_attn.head_groups.head_groups_attention`.
        causal: AND the bottom-right causal predicate ``j <= i + (Lk - Lq)`` into the mask.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log; -inf on empty rows).
        backend: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``.

    Returns:
        ``o`` ``[B, Hq, Lq, D]`` in q's dtype (rows that see no key are 0), and ``lse`` when asked.
        Differentiable in q, k and v on both backends (through ``lse`` too); rows that see no key get
        zero gradients.

    Example:
        >>> q = k = v = torch.randn(1, 2, 100, 32)
        >>> keep = torch.ones(1, 1, 2, 2, dtype=torch.bool)
        >>> mask = BlockSparseMask.from_dense(keep, 64, seq_lens=(100, 100))
        >>> sparse_attention(q, k, v, mask).shape
        torch.Size([1, 2, 100, 32])
    """
    if isinstance(mask, StripeSparseMask):
        return stripe_attention(q, k, v, mask, causal=causal, scale=scale, return_lse=return_lse, backend=backend)
    if isinstance(mask, PermutedMask):
        return permuted_attention(q, k, v, mask, causal=causal, scale=scale, return_lse=return_lse, backend=backend)
    if isinstance(mask, RoutedMask):
        return routed_attention(q, k, v, mask, causal=causal, scale=scale, return_lse=return_lse, backend=backend)
    if isinstance(mask, HeadGroupsMask):
        return head_groups_attention(q, k, v, mask, causal=causal, scale=scale, return_lse=return_lse,
                                     backend=backend)
    check_qkv(q, k, v, backend)
    if mask is not None:
        _check_mask(mask, q, k)
    backend = resolve_backend(backend, q, None if mask is None else mask.block_size)
    scale = check_scale(scale, q)
    batch, n_q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if batch == 0 or q_len == 0 or kv_len == 0:
        o, lse = empty_attention(q, k, v)
        return (o, lse) if return_lse else o
    causal, scale = bool(causal), float(scale)
    if mask is None:
        bm = bn = DENSE_BLOCK
        counts, indices, counts_t, indices_t = _dense_lists(q_len, kv_len, DENSE_BLOCK, q.device)
    else:
        bm, bn = mask.block_size
        counts, indices, counts_t, indices_t = mask.counts, mask.indices, None, None
    if backend == "triton":
        from sparse_attn_kernels.block_sparse.op import block_sparse_attn

        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        if mask is not None and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            counts_t, indices_t = _kv_major(mask)
        o, lse = block_sparse_attn(q, k, v, counts, indices, bm, bn, causal, scale,
                                   counts_t=counts_t, indices_t=indices_t)
    elif _use_cpu_path(q, k, v, return_lse):
        o, lse = block_sparse_attn_cpu(q, k, v, counts, indices, bm, bn, causal, scale)
        lse = lse.float()
    else:
        o, lse = block_sparse_attn_ref(q, k, v, counts, indices, bm, bn, causal, scale)
        lse = lse.float()
    return (o, lse) if return_lse else o


def _use_cpu_path(q, k, v, return_lse):
    """The fused CPU path runs CPU tensors; gradients through lse need the reference path."""
    if q.device.type != "cpu" or not cpu_path_available():
        return False
    lse_grad = return_lse and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return not lse_grad


def _dense_lists(q_len, kv_len, block, device):
    """Query- and key-major lists of the all-kept mask, built without data-dependent Python (traceable)."""
    n_qb, n_kb = -(-q_len // block), -(-kv_len // block)
    counts = torch.full((1, 1, n_qb), n_kb, dtype=torch.int32, device=device)
    indices = torch.arange(n_kb, dtype=torch.int32, device=device).expand(1, 1, n_qb, n_kb).contiguous()
    counts_t = torch.full((1, 1, n_kb), n_qb, dtype=torch.int32, device=device)
    indices_t = torch.arange(n_qb, dtype=torch.int32, device=device).expand(1, 1, n_kb, n_qb).contiguous()
    return counts, indices, counts_t, indices_t


def _kv_major(mask):
    """The mask's key-major lists for the backward.

    Eagerly (or when already cached) this is ``mask.kv_major()``. Inside ``torch.compile`` an
    uncached mask would need ``.item()`` for the list width, a graph break; there the lists are
    derived with the static width NQB instead (the kernels read only the first ``counts_t`` entries).
    """
    if torch.compiler.is_compiling() and getattr(mask, "_kv_major", None) is None:
        keep_t = mask.to_block_dense().transpose(-1, -2)  # [Bm, Hm, NKB, NQB]
        counts_t = keep_t.sum(-1, dtype=torch.int32)
        # stable sort of "not kept" puts the kept query blocks first, in increasing order
        indices_t = torch.sort((~keep_t).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        return counts_t.contiguous(), indices_t.contiguous()
    return mask.kv_major()
