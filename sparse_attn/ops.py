"""``sparse_attention``: validation and dispatch to the Triton kernel or the PyTorch path."""

import os

import torch

from sparse_attn_kernels.block_sparse.cpu import available as cpu_path_available
from sparse_attn_kernels.block_sparse.cpu import block_sparse_attn_cpu
from sparse_attn_kernels.reference import block_sparse_attn_ref

from ._checks import check_tensor
from .mask import BlockSparseMask
from .stripe_mask import StripeSparseMask
from .stripe_ops import stripe_attention

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
    if isinstance(mask, StripeSparseMask):
        return stripe_attention(q, k, v, mask, causal=causal, scale=scale, return_lse=return_lse, backend=backend)
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
        # zeros that stay attached to q, k, v (a sum over an empty slice is exactly 0), so that a
        # backward through an empty attention gives zero gradients instead of an autograd error
        attach = q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum()
        o = q.new_zeros(q.shape) + attach
        lse = torch.full((batch, n_q_heads, q_len), float("-inf"), dtype=torch.float32, device=q.device)
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
