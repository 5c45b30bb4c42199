"""``sparse_attention``: validation and dispatch to the Triton kernel or the PyTorch path."""

import torch

from sparse_attn_kernels.block_sparse.cpu import block_sparse_attn_cpu
from sparse_attn_kernels._common.predicates import TokenPredicates
from sparse_attn_kernels.reference import block_sparse_attn_ref

from ._checks import (check_bool, check_mask_fits, check_qkv, check_scale, empty_attention, resolve_backend,
                      use_fused_cpu_path)
from .mask import BlockSparseMask
from .stripe_mask import StripeSparseMask
from .stripe_ops import stripe_attention
from .mask_kinds import mask_kind

DENSE_BLOCK = 64


def _check_mask(mask, q, k):
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a BlockSparseMask or None, got {type(mask).__name__}.")
    check_mask_fits(mask, q, k)
    pb = mask.predicate_batch
    if pb not in (1, q.shape[0]):
        raise ValueError(f"mask's token predicates (ranges, segments) have batch {pb}, expected 1 or {q.shape[0]}.")


def check_key_bias(key_bias, q, k):
    """``key_bias``: None or a floating ``[B|1, H|1, Lk]`` tensor on q's device, ``H`` the query or kv heads."""
    if key_bias is None:
        return
    if not isinstance(key_bias, torch.Tensor):
        raise TypeError(f"key_bias must be a torch.Tensor or None, got {type(key_bias).__name__}.")
    if not key_bias.is_floating_point():
        raise TypeError(f"key_bias must have a floating dtype, got {key_bias.dtype}.")
    batch, n_q_heads, n_kv_heads, kv_len = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
    shape = list(key_bias.shape)
    if (key_bias.dim() != 3 or shape[0] not in (1, batch) or shape[1] not in (1, n_kv_heads, n_q_heads)
            or shape[2] != kv_len):
        raise ValueError(f"key_bias must have shape [B|1, H|1, Lk] = [{batch}|1, {n_q_heads}|{n_kv_heads}|1, "
                         f"{kv_len}], got {shape}.")
    if key_bias.device != q.device:
        raise ValueError(f"key_bias must be on q's device {q.device}, got {key_bias.device}.")


def sparse_attention(q, k, v, mask=None, *, causal=False, window=None, scale=None, return_lse=False,
                     backend="auto", key_bias=None):
    """Attention restricted to the pairs of ``mask``, exact at token level.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA without repeating K/V).
        mask: :class:`BlockSparseMask` for ``(Lq, Lk)`` (tiles plus its token predicates: band, padding
            ranges, segments, bit masks), or None for dense attention;
            a :class:`StripeSparseMask` goes to :func:`stripe_attention`, and a composite mask registered
            in :mod:`sparse_attn.mask_kinds` to its own attend function: :class:`~sparse_attn.PermutedMask`
            (non-causal) to :func:`~sparse_attn.permuted_attention`, :class:`~sparse_attn.RoutedMask` to
            :func:`~sparse_attn.routed_attention`, :class:`~sparse_attn.head_groups.HeadGroupsMask` to
            :func:`~sparse_attn.head_groups.head_groups_attention`.
        causal: AND the bottom-right causal predicate ``j <= i + (Lk - Lq)`` into the mask.
        window: ``(left, right)`` sliding window ANDed in (FlashAttention's ``window_size``: key ``j`` seen by
            query ``i`` iff ``-left <= j - (i + Lk - Lq) <= right``; ``-1`` = unbounded side).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log; -inf on empty rows).
        backend: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``.
        key_bias: optional float ``[B|1, H|1, Lk]`` (``H`` the query or the key/value heads) added to the score
            of key ``j`` for every query: ``softmax(scale * q k^T + key_bias)`` over the kept pairs (a trainable
            per-key bias, as Dynamic Mask Attention uses). Differentiable (its gradient sums ``dS`` over the
            queries). With a :class:`BlockSparseMask` or no mask; on CPU it runs the chunked PyTorch reference.
            ``-inf`` excludes a key; ``+inf`` or NaN on a kept key gives NaN rows.
        ``o`` ``[B, Hq, Lq, D]`` in q's dtype (rows that see no key are 0), and ``lse`` when asked.
        Differentiable in q, k and v on both backends (through ``lse`` too); rows that see no key get
        zero gradients. A key the mask excludes never influences any output, whatever its value; a row
        that sees a NaN/Inf key or value gives NaN (and NaN lse).

    Example:
        >>> q = k = v = torch.randn(1, 2, 100, 32)
        >>> keep = torch.ones(1, 1, 2, 2, dtype=torch.bool)
        >>> mask = BlockSparseMask.from_dense(keep, 64, seq_lens=(100, 100))
        >>> sparse_attention(q, k, v, mask).shape
        torch.Size([1, 2, 100, 32])
    """
    check_bool(causal, "causal")
    check_bool(return_lse, "return_lse")
    if key_bias is not None and mask is not None and not isinstance(mask, BlockSparseMask):
        raise ValueError(f"key_bias is supported with a BlockSparseMask or no mask, got a {type(mask).__name__}.")
    if isinstance(mask, StripeSparseMask):
        _no_window(window, "StripeSparseMask")
        return stripe_attention(q, k, v, mask, causal=causal, scale=scale, return_lse=return_lse, backend=backend)
    kind = mask_kind(mask)
    if kind is not None:  # a composite mask runs itself, calling back down here for its inner masks
        _no_window(window, type(mask).__name__)
        return kind.attend(q, k, v, mask, causal=causal, scale=scale, return_lse=return_lse, backend=backend)
    check_qkv(q, k, v, backend)
    check_key_bias(key_bias, q, k)
    if mask is not None:
        _check_mask(mask, q, k)
    backend = resolve_backend(backend, q, None if mask is None else mask.block_size)
    scale = check_scale(scale, q)
    batch, n_q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if batch == 0 or n_q_heads == 0 or q_len == 0 or kv_len == 0:
        o, lse = empty_attention(q, k, v)
        return (o, lse) if return_lse else o
    causal, scale = bool(causal), float(scale)
    if window is not None and tuple(window) != (-1, -1):
        mask = (BlockSparseMask.full(q_len, kv_len, DENSE_BLOCK, device=q.device) if mask is None else mask)
        mask = mask.with_predicates(window=tuple(window))
    if mask is None:
        bm = bn = DENSE_BLOCK
        counts, indices, counts_t, indices_t = _dense_lists(q_len, kv_len, DENSE_BLOCK, q.device)
        preds = TokenPredicates()
    else:
        bm, bn = mask.block_size
        counts, indices, counts_t, indices_t = mask.counts, mask.indices, None, None
        preds = mask.token_predicates()
    if backend == "triton":
        from sparse_attn_kernels.block_sparse.op import block_sparse_attn

        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        needs_grad = any(x is not None and x.requires_grad for x in (q, k, v, key_bias))
        if mask is not None and torch.is_grad_enabled() and needs_grad:
            counts_t, indices_t, slots_t = _kv_major(mask)
            preds = preds._replace(bit_slots_t=slots_t)
        o, lse = block_sparse_attn(q, k, v, counts, indices, bm, bn, causal, scale,
                                   counts_t=counts_t, indices_t=indices_t, preds=preds, key_bias=key_bias)
    elif key_bias is None and use_fused_cpu_path(q, k, v, return_lse):
        o, lse = block_sparse_attn_cpu(q, k, v, counts, indices, bm, bn, causal, scale, preds=preds)
        lse = lse.float()
    else:
        o, lse = block_sparse_attn_ref(q, k, v, counts, indices, bm, bn, causal, scale, preds=preds,
                                       key_bias=key_bias)
        lse = lse.float()
    return (o, lse) if return_lse else o


def _no_window(window, kind):
    if window is not None and tuple(window) != (-1, -1):
        raise ValueError(f"window= is supported with a BlockSparseMask or no mask, got a {kind}; put the window "
                         f"into the pattern instead.")


def _dense_lists(q_len, kv_len, block, device):
    """Query- and key-major lists of the all-kept mask, built without data-dependent Python (traceable)."""
    n_qb, n_kb = -(-q_len // block), -(-kv_len // block)
    counts = torch.full((1, 1, n_qb), n_kb, dtype=torch.int32, device=device)
    indices = torch.arange(n_kb, dtype=torch.int32, device=device).expand(1, 1, n_qb, n_kb).contiguous()
    counts_t = torch.full((1, 1, n_kb), n_qb, dtype=torch.int32, device=device)
    indices_t = torch.arange(n_qb, dtype=torch.int32, device=device).expand(1, 1, n_kb, n_qb).contiguous()
    return counts, indices, counts_t, indices_t


def _kv_major(mask):
    """The mask's key-major lists (and bit slots, or None) for the backward.

    Eagerly (or when already cached) this is ``mask.kv_major()``. Inside ``torch.compile`` an
    uncached mask would need ``.item()`` for the list width, a graph break; there the lists are
    derived with the static width NQB instead (the kernels read only the first ``counts_t`` entries).
    """
    if torch.compiler.is_compiling() and getattr(mask, "_kv_major", None) is None:
        keep_t = mask.to_block_dense().transpose(-1, -2)  # [Bm, Hm, NKB, NQB]
        counts_t = keep_t.sum(-1, dtype=torch.int32)
        # stable sort of "not kept" puts the kept query blocks first, in increasing order
        indices_t = torch.sort((~keep_t).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        slots_t = None
        if mask.has_bits:
            dense_t = mask.slot_map().to(torch.int32).transpose(-1, -2)  # [Bm, Hm, NKB, NQB]
            slots_t = torch.gather(dense_t, -1, indices_t.long()).contiguous()
        return counts_t.contiguous(), indices_t.contiguous(), slots_t
    counts_t, indices_t = mask.kv_major()
    return counts_t, indices_t, mask.bit_slots_t()
