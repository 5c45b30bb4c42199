"""Autograd and ``torch.library`` wrappers and the public kernel entry point (Triton).

The forward and backward launchers are registered as the custom ops
``sparse_attn::block_sparse_attn_fwd`` and ``sparse_attn::block_sparse_attn_bwd`` with fake
(meta) implementations, and the forward op carries its backward through
``register_autograd``. ``torch.compile`` therefore sees one opaque node per pass and traces
a model that calls :func:`block_sparse_attn` without graph breaks.

The key-major lists that the dK/dV kernel walks come from the caller
(``BlockSparseMask.kv_major()``): this package never imports ``sparse_attn``.
"""

from typing import Optional, Tuple

import torch

from .._common.predicates import NO_PREDICATES, flat, unflat
from .bwd import _grad_like, block_sparse_bwd
from .fwd import block_sparse_fwd

Tensor = torch.Tensor


def _unit_last(x):
    """The kernels take any strides except along the head dim, which must be 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _varlen(cu_q, cu_k, max_q, max_k):
    return None if cu_q is None else (cu_q, cu_k, max_q, max_k)


# the predicates travel flattened (kernels/_common/predicates.py: flat / unflat); packed (varlen) calls
# pass cu_q / cu_k with the largest lengths
@torch.library.custom_op("sparse_attn::block_sparse_attn_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, counts_t: Optional[Tensor],
            indices_t: Optional[Tensor], block_m: int, block_n: int, causal: bool,
            scale: float, left: int, right: int, q_range: Optional[Tensor], kv_range: Optional[Tensor],
            q_segments: Optional[Tensor], kv_segments: Optional[Tensor], bit_slots: Optional[Tensor],
            bit_words: Optional[Tensor], bit_slots_t: Optional[Tensor], cu_q: Optional[Tensor],
            cu_k: Optional[Tensor], max_q: int, max_k: int,
            key_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    # counts_t / indices_t / bit_slots_t are unused here; they are inputs so that the backward can save them.
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    preds = unflat((left, right, q_range, kv_range, q_segments, kv_segments, bit_slots, bit_words, bit_slots_t))
    return block_sparse_fwd(q, k, v, counts, indices, block_m, block_n, causal, scale, preds=preds,
                            varlen=_varlen(cu_q, cu_k, max_q, max_k), key_bias=key_bias)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale, *rest, key_bias=None):
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cu_q = rest[9]
    lse_shape = q.shape[:3] if cu_q is None else (q.shape[1], q.shape[0])
    return o, torch.empty(lse_shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("sparse_attn::block_sparse_attn_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Optional[Tensor],
            counts: Tensor, indices: Tensor, counts_t: Tensor, indices_t: Tensor, block_m: int, block_n: int,
            causal: bool, scale: float, left: int, right: int, q_range: Optional[Tensor],
            kv_range: Optional[Tensor], q_segments: Optional[Tensor], kv_segments: Optional[Tensor],
            bit_slots: Optional[Tensor], bit_words: Optional[Tensor], bit_slots_t: Optional[Tensor],
            cu_q: Optional[Tensor], cu_k: Optional[Tensor], max_q: int,
            max_k: int, key_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dbias)``; ``dbias`` is an empty tensor when there is no ``key_bias``."""
    do, q, k, v, o = (_unit_last(x) for x in (do, q, k, v, o))
    preds = unflat((left, right, q_range, kv_range, q_segments, kv_segments, bit_slots, bit_words, bit_slots_t))
    grads = block_sparse_bwd(do, q, k, v, o, lse, counts, indices, counts_t, indices_t, block_m, block_n,
                             causal, scale, dlse=dlse, preds=preds, varlen=_varlen(cu_q, cu_k, max_q, max_k),
                             key_bias=key_bias)
    return grads if key_bias is not None else grads + (q.new_empty(0),)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, dlse, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale,
              left, right, q_range, kv_range, q_segments, kv_segments, bit_slots, bit_words, bit_slots_t, cu_q, cu_k,
              max_q, max_k, key_bias=None):
    dbias = q.new_empty(0) if key_bias is None else torch.empty_like(key_bias)
    return _grad_like(q), _grad_like(k), _grad_like(v), dbias


def _setup_context(ctx, inputs, output):
    (q, k, v, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale, left, right,
     *tensors, max_q, max_k) = inputs[:24]
    key_bias = inputs[24] if len(inputs) > 24 else None  # the optional last input
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, counts, indices, counts_t, indices_t, key_bias, *tensors)
    ctx.n_inputs = len(inputs)
    ctx.config = (block_m, block_n, causal, scale, left, right, max_q, max_k)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, counts, indices, counts_t, indices_t, key_bias, *tensors = ctx.saved_tensors
    block_m, block_n, causal, scale, left, right, max_q, max_k = ctx.config
    if counts_t is None or indices_t is None:
        raise ValueError("counts_t and indices_t (the key-major lists, BlockSparseMask.kv_major()) must be "
                         "passed to the forward for a backward pass, got None.")
    dq, dk, dv, dbias = torch.ops.sparse_attn.block_sparse_attn_bwd(
        do, q, k, v, o, lse, dlse, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale,
        left, right, *tensors, max_q, max_k, key_bias)
    grads = (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)
    if key_bias is not None:
        grads = grads[:24] + (dbias,)
    return grads


torch.library.register_autograd("sparse_attn::block_sparse_attn_fwd", _backward, setup_context=_setup_context)


class BlockSparseAttnFunction(torch.autograd.Function):
    """``(o, lse) = BlockSparseAttnFunction.apply(q, k, v, counts, indices, counts_t, indices_t,
    block_m, block_n, causal, scale)``, an eager ``autograd.Function`` over the same custom ops
    (no predicates; :func:`block_sparse_attn` takes them).

    :func:`block_sparse_attn` calls the registered op directly (that is what ``torch.compile``
    traces); this class is kept for callers that want an ``autograd.Function``.
    """

    @staticmethod
    def forward(ctx, q, k, v, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale):
        args = (q, k, v, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale,
                *flat(NO_PREDICATES), None, None, 0, 0)
        o, lse = torch.ops.sparse_attn.block_sparse_attn_fwd(*args)
        _setup_context(ctx, args, (o, lse))
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        return _backward(ctx, do, dlse)[:11]


def block_sparse_attn(q, k, v, counts, indices, block_m, block_n, causal=False, scale=None, counts_t=None,
                      indices_t=None, preds=NO_PREDICATES, varlen=None, key_bias=None):
    """Block-sparse attention with the Triton kernels, differentiable in q, k, v (and through lse).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``, unit last stride.
        counts: int32 ``[Bm, Hm, NQB]``; indices: int32 ``[Bm, Hm, NQB, W]`` (see docs/masks.md).
        block_m, block_n: the mask's block size; causal: bottom-right causal; scale: default ``1/sqrt(D)``.
        counts_t, indices_t: key-major lists ``[Bm, Hm, NKB]`` / ``[Bm, Hm, NKB, Wt]``
            (``BlockSparseMask.kv_major()``); needed only when a gradient is taken.
        preds: in-tile token predicates (:class:`~sparse_attn_kernels._common.predicates.TokenPredicates`;
            ``bit_slots_t`` is needed for a gradient when it has bits).
        varlen: ``(cu_q, cu_k, max_q, max_k)``: packed q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``.
        key_bias: optional float ``[B|1, Hq|Hkv|1, Lk]`` added to the scores of key ``j`` for every query
            (after ``scale``); differentiable. Not with ``varlen``.

    Returns:
        ``(o, lse)``: ``[B, Hq, Lq, D]`` and float32 ``[B, Hq, Lq]`` (packed: ``[total_q, Hq, D]`` and
        ``[Hq, total_q]``).

    Example:
        >>> o, lse = block_sparse_attn(q, k, v, mask.counts, mask.indices, 64, 64, True,
        ...                            counts_t=mask.kv_major()[0], indices_t=mask.kv_major()[1])
        >>> o.sum().backward()
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    cu_q, cu_k, max_q, max_k = varlen if varlen is not None else (None, None, 0, 0)
    return torch.ops.sparse_attn.block_sparse_attn_fwd(
        q, k, v, counts, indices, counts_t, indices_t, int(block_m), int(block_n), bool(causal), float(scale),
        *flat(preds), cu_q, cu_k, int(max_q), int(max_k), key_bias)
