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

from .bwd import _grad_like, block_sparse_bwd
from .fwd import block_sparse_fwd

Tensor = torch.Tensor


def _unit_last(x):
    """The kernels take any strides except along the head dim, which must be 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("sparse_attn::block_sparse_attn_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, counts_t: Optional[Tensor],
            indices_t: Optional[Tensor], block_m: int, block_n: int, causal: bool,
            scale: float) -> Tuple[Tensor, Tensor]:
    # counts_t / indices_t are unused here; they are inputs so that the backward can save them.
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    return block_sparse_fwd(q, k, v, counts, indices, block_m, block_n, causal, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale):
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    return o, lse


@torch.library.custom_op("sparse_attn::block_sparse_attn_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Optional[Tensor],
            counts: Tensor, indices: Tensor, counts_t: Tensor, indices_t: Tensor, block_m: int, block_n: int,
            causal: bool, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    do, q, k, v, o = (_unit_last(x) for x in (do, q, k, v, o))
    return block_sparse_bwd(do, q, k, v, o, lse, counts, indices, counts_t, indices_t, block_m, block_n,
                            causal, scale, dlse=dlse)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, dlse, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale):
    return _grad_like(q), _grad_like(k), _grad_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, counts, indices, counts_t, indices_t)
    ctx.config = (block_m, block_n, causal, scale)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, counts, indices, counts_t, indices_t = ctx.saved_tensors
    if counts_t is None or indices_t is None:
        raise ValueError("counts_t and indices_t (the key-major lists, BlockSparseMask.kv_major()) must be "
                         "passed to the forward for a backward pass, got None.")
    dq, dk, dv = torch.ops.sparse_attn.block_sparse_attn_bwd(
        do, q, k, v, o, lse, dlse, counts, indices, counts_t, indices_t, *ctx.config)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("sparse_attn::block_sparse_attn_fwd", _backward, setup_context=_setup_context)


class BlockSparseAttnFunction(torch.autograd.Function):
    """``(o, lse) = BlockSparseAttnFunction.apply(q, k, v, counts, indices, counts_t, indices_t,
    block_m, block_n, causal, scale)``, an eager ``autograd.Function`` over the same custom ops.

    :func:`block_sparse_attn` calls the registered op directly (that is what ``torch.compile``
    traces); this class is kept for callers that want an ``autograd.Function``.
    """

    @staticmethod
    def forward(ctx, q, k, v, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale):
        o, lse = torch.ops.sparse_attn.block_sparse_attn_fwd(
            q, k, v, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale)
        _setup_context(ctx, (q, k, v, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale),
                       (o, lse))
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        return _backward(ctx, do, dlse)


def block_sparse_attn(q, k, v, counts, indices, block_m, block_n, causal=False, scale=None, counts_t=None,
                      indices_t=None):
    """Block-sparse attention with the Triton kernels, differentiable in q, k, v (and through lse).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``, unit last stride.
        counts: int32 ``[Bm, Hm, NQB]``; indices: int32 ``[Bm, Hm, NQB, W]`` (see docs/masks.md).
        block_m, block_n: the mask's block size; causal: bottom-right causal; scale: default ``1/sqrt(D)``.
        counts_t, indices_t: key-major lists ``[Bm, Hm, NKB]`` / ``[Bm, Hm, NKB, Wt]``
            (``BlockSparseMask.kv_major()``); needed only when a gradient is taken.

    Returns:
        ``(o, lse)``: ``[B, Hq, Lq, D]`` and float32 ``[B, Hq, Lq]``.

    Example:
        >>> o, lse = block_sparse_attn(q, k, v, mask.counts, mask.indices, 64, 64, True,
        ...                            counts_t=mask.kv_major()[0], indices_t=mask.kv_major()[1])
        >>> o.sum().backward()
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.sparse_attn.block_sparse_attn_fwd(
        q, k, v, counts, indices, counts_t, indices_t, int(block_m), int(block_n), bool(causal), float(scale))
