"""``sparse_attention``: validation and dispatch to the Triton kernel or the PyTorch path."""

import os

import torch

from sparse_attn_kernels.reference import block_sparse_fwd_ref

from ._checks import check_tensor
from .mask import BlockSparseMask

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_BLOCKS = (16, 32, 64, 128)
_TRITON_HEAD_DIMS = (16, 256)
_BACKENDS = ("auto", "triton", "torch")
DENSE_BLOCK = 64


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
    batch, n_q_heads, _, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Lk, D], got {list(k.shape)} and {list(v.shape)}.")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must have batch {batch} and head dim {head_dim} like q, got shape {list(k.shape)}.")
    n_kv_heads = k.shape[1]
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_q_heads}) must be a multiple of key/value heads ({n_kv_heads}).")


def _check_mask(mask, q, k):
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a BlockSparseMask or None, got {type(mask).__name__}.")
    q_len, kv_len = q.shape[2], k.shape[2]
    if mask.seq_lens != (q_len, kv_len):
        raise ValueError(f"mask was built for seq_lens={mask.seq_lens}, but q and k have lengths ({q_len}, {kv_len}).")
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
        head_dim = q.shape[-1]
        if not _TRITON_HEAD_DIMS[0] <= head_dim <= _TRITON_HEAD_DIMS[1]:
            raise ValueError(f"head dim must be in [16, 256] for the Triton kernel, got {head_dim}.")
        if mask is not None and any(b not in _TRITON_BLOCKS for b in mask.block_size):
            raise ValueError(f"mask.block_size must use sizes in {_TRITON_BLOCKS} for the Triton kernel, "
                             f"got {mask.block_size}.")
    return backend


def sparse_attention(q, k, v, mask=None, *, causal=False, scale=None, return_lse=False, backend="auto"):
    """Attention restricted to the tiles of ``mask``, exact inside them.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA without repeating K/V).
        mask: :class:`BlockSparseMask` for ``(Lq, Lk)``, or None for dense attention.
        causal: AND the bottom-right causal predicate ``j <= i + (Lk - Lq)`` into the mask.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log; -inf on empty rows).
        backend: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``.

    Returns:
        ``o`` ``[B, Hq, Lq, D]`` in q's dtype (rows that see no key are 0), and ``lse`` when asked.

    Example:
        >>> q = k = v = torch.randn(1, 2, 100, 32)
        >>> keep = torch.ones(1, 1, 2, 2, dtype=torch.bool)
        >>> mask = BlockSparseMask.from_dense(keep, 64, seq_lens=(100, 100))
        >>> sparse_attention(q, k, v, mask).shape
        torch.Size([1, 2, 100, 32])
    """
    backend_in = backend
    _check_qkv(q, k, v, backend_in)
    if mask is not None:
        _check_mask(mask, q, k)
    backend = _resolve_backend(backend_in, q, mask)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}.")
    batch, n_q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if batch == 0 or q_len == 0 or kv_len == 0:
        o = q.new_zeros(q.shape)
        lse = torch.full((batch, n_q_heads, q_len), float("-inf"), dtype=torch.float32, device=q.device)
        return (o, lse) if return_lse else o
    if mask is None:
        mask = BlockSparseMask.full(q_len, kv_len, DENSE_BLOCK, device=q.device)
    bm, bn = mask.block_size
    if backend == "triton":
        from sparse_attn_kernels.block_sparse.op import block_sparse_attn

        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        o, lse = block_sparse_attn(q, k, v, mask.counts, mask.indices, bm, bn, bool(causal), float(scale))
    else:
        o, lse = block_sparse_fwd_ref(q, k, v, mask.counts, mask.indices, bm, bn, bool(causal), float(scale))
        lse = lse.float()
    return (o, lse) if return_lse else o
