"""Packed (variable-length) batches, as ``flash_attn_varlen_func``: sequences concatenated along tokens.

``sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask)``:
sequence ``s`` is rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of q and ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``
of k and v; it attends only to itself, causal and windows aligned bottom-right to its own ends.

The mask is **per sequence**: a :class:`BlockSparseMask` with batch 1 (one mask for every sequence) or
``num_seqs`` (batch row ``s`` = sequence ``s``) and ``seq_lens = (max_seqlen_q, max_seqlen_k)``, in each
sequence's own coordinates (token 0 = its first token); :func:`stack_masks` builds one from per-sequence
masks of different lengths. The Triton kernels read the packed tensors in place (no padding copy); the
PyTorch path gathers the sequences into a padded batch and back.
"""

from typing import Sequence

import torch

from ._checks import check_bool, check_scale, check_tensor, resolve_backend
from .mask import BlockSparseMask
from .ops import sparse_attention


def _check_cu(cu, name, total):
    check_tensor(cu, name)
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor [num_seqs + 1], got "
                         f"{cu.dtype} {list(cu.shape)}.")
    c = cu.tolist()
    if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"{name} must start at 0, not decrease and end at the {total} packed tokens, got {c}.")
    return torch.tensor(c[1:], dtype=torch.int64) - torch.tensor(c[:-1], dtype=torch.int64)


def stack_masks(masks: Sequence[BlockSparseMask], max_seqlen_q: int, max_seqlen_k: int) -> BlockSparseMask:
    """One varlen mask (batch row ``s`` = ``masks[s]``) from per-sequence masks of their own lengths.

    Each mask must have batch 1, the same heads and block size; lists are padded to the longest
    sequence (the padding rows and keys are never read: each sequence's lengths bound its rows).
    Token predicates other than a window are not supported here (the sequences' lengths are).
    """
    if not masks:
        raise ValueError("masks must hold one BlockSparseMask per sequence, got an empty list.")
    bs, heads = masks[0].block_size, masks[0].batch_heads[1]
    n_qb, n_kb = -(-max_seqlen_q // bs[0]), -(-max_seqlen_k // bs[1])
    keeps = []
    for s, m in enumerate(masks):
        if not isinstance(m, BlockSparseMask):
            raise TypeError(f"masks[{s}] must be a BlockSparseMask, got {type(m).__name__}.")
        if m.block_size != bs or m.batch_heads != (1, heads):
            raise ValueError(f"masks[{s}] must have block_size {bs} and batch_heads (1, {heads}), got "
                             f"{m.block_size} and {m.batch_heads}.")
        if m.has_predicates:
            raise ValueError(f"masks[{s}] has token predicates ({m._describe_predicates()}); stack_masks takes "
                             f"tile masks (pass window= to sparse_attention_varlen).")
        if m.q_len > max_seqlen_q or m.kv_len > max_seqlen_k:
            raise ValueError(f"masks[{s}] has seq_lens {m.seq_lens}, longer than ({max_seqlen_q}, {max_seqlen_k}).")
        keep = m.to_block_dense()
        keeps.append(torch.nn.functional.pad(keep, (0, n_kb - keep.shape[-1], 0, n_qb - keep.shape[-2])))
    return BlockSparseMask.from_dense(torch.cat(keeps), bs, (max_seqlen_q, max_seqlen_k))


def _check_mask(mask, n_seqs, max_q, max_k):
    if mask is None:
        return
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a BlockSparseMask (per sequence) or None, got {type(mask).__name__}; "
                        f"use stack_masks for a list of per-sequence masks.")
    if mask.seq_lens != (max_q, max_k):
        raise ValueError(f"mask must be built for seq_lens=(max_seqlen_q, max_seqlen_k)=({max_q}, {max_k}), got "
                         f"{mask.seq_lens}.")
    if mask.batch_heads[0] not in (1, n_seqs):
        raise ValueError(f"mask batch must be 1 or the {n_seqs} sequences, got {mask.batch_heads[0]}.")
    if mask.q_range is not None or mask.kv_range is not None or mask.q_segments is not None:
        raise ValueError("a varlen mask cannot carry ranges or segments: cu_seqlens define each sequence.")


def _pad_rows(x, lengths, starts, max_len):
    """[total, H, D] -> [S, H, max_len, D] (zero padded) and the gather index ``[S, max_len]`` (-1 padding)."""
    pos = torch.arange(max_len, device=x.device)
    idx = starts[:, None] + pos[None, :]
    valid = pos[None, :] < lengths[:, None]
    flat = torch.where(valid, idx, 0)
    out = x[flat.reshape(-1)].reshape(*flat.shape, *x.shape[1:])
    out = torch.where(valid[..., None, None], out, 0.0)  # padding rows are zeros, never a copied value
    return out.permute(0, 2, 1, 3), torch.where(valid, idx, -1)


def sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=None, *,
                            causal=False, window=(-1, -1), scale=None, return_lse=False, backend="auto"):
    """Sparse attention over a packed batch of sequences (``flash_attn_varlen_func``'s layout).

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[num_seqs + 1]`` sequence starts (0 first, totals last).
        max_seqlen_q, max_seqlen_k: the longest sequences (at least the longest in ``cu_seqlens``).
        mask: per-sequence :class:`BlockSparseMask` for ``(max_seqlen_q, max_seqlen_k)`` (batch 1 or
            num_seqs), or None for dense attention within each sequence.
        causal, window: bottom-right aligned to each sequence's own ends (``window`` as FlashAttention's
            ``window_size``, ``-1`` = unbounded).
        scale, return_lse, backend: as :func:`~sparse_attn.sparse_attention`.

    Returns:
        ``o`` ``[total_q, Hq, D]`` and, with ``return_lse``, float32 ``lse`` ``[Hq, total_q]``.

    Example:
        >>> cu = torch.tensor([0, 100, 250], dtype=torch.int32)
        >>> q = k = v = torch.randn(250, 4, 32)
        >>> sparse_attention_varlen(q, k, v, cu, cu, 150, 150, causal=True).shape
        torch.Size([250, 4, 32])
    """
    check_bool(causal, "causal")
    check_bool(return_lse, "return_lse")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name)
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape [total, H, D] (rank 3), got {list(x.shape)}.")
    lq = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    lk = _check_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    if lq.numel() != lk.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got {lq.numel()} and "
                         f"{lk.numel()}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [total_k, Hkv, D], got {list(k.shape)} and {list(v.shape)}.")
    n_seqs = lq.numel()
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    if n_seqs and (int(lq.max()) > max_q or int(lk.max()) > max_k):
        raise ValueError(f"max_seqlen_q/max_seqlen_k ({max_q}, {max_k}) must be at least the longest sequences "
                         f"({int(lq.max())}, {int(lk.max())}).")
    _check_mask(mask, n_seqs, max_q, max_k)
    if q.dtype != k.dtype or k.dtype != v.dtype or not (q.device == k.device == v.device):
        raise TypeError(f"q, k and v must share one dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                        f"{q.device}/{k.device}/{v.device}.")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [total_q, Hq, D] and k [total_k, Hkv, D] need Hq % Hkv == 0 and one head dim, got "
                         f"{list(q.shape)} and {list(k.shape)}.")
    mask = BlockSparseMask.full(max_q, max_k, 64, device=q.device) if mask is None else mask
    mask = mask.with_predicates(window=tuple(window))
    if resolve_backend(backend, q, mask.block_size) == "triton":
        return _varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, mask, causal, scale, return_lse)
    zero = torch.zeros_like(lq).to(q.device)
    mask = mask.with_predicates(q_range=torch.stack([zero, lq.to(q.device)], 1),
                                kv_range=torch.stack([zero, lk.to(q.device)], 1))
    qp, q_idx = _pad_rows(q, lq.to(q.device), cu_seqlens_q[:-1].long(), max_q)  # [S, Hq, Mq, D]
    kp, _ = _pad_rows(k, lk.to(q.device), cu_seqlens_k[:-1].long(), max_k)
    vp, _ = _pad_rows(v, lk.to(q.device), cu_seqlens_k[:-1].long(), max_k)
    o, lse = sparse_attention(qp, kp, vp, mask, causal=causal, scale=scale, return_lse=True, backend=backend)
    keep = q_idx >= 0  # [S, Mq]
    out = o.permute(0, 2, 1, 3)[keep]  # [total_q, Hq, D] in packed order
    if not return_lse:
        return out
    return out, lse.permute(0, 2, 1)[keep].transpose(0, 1).contiguous()


def _varlen_triton(q, k, v, cu_q, cu_k, max_q, max_k, mask, causal, scale, return_lse):
    """The Triton kernels on the packed tensors in place (sequence s = batch row s)."""
    from sparse_attn_kernels.block_sparse.op import block_sparse_attn

    from .ops import _kv_major
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    scale = check_scale(scale, q)
    preds = mask.token_predicates()
    counts_t = indices_t = None
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        counts_t, indices_t, slots_t = _kv_major(mask)
        preds = preds._replace(bit_slots_t=slots_t)
    o, lse = block_sparse_attn(q, k, v, mask.counts, mask.indices, *mask.block_size, bool(causal), float(scale),
                               counts_t=counts_t, indices_t=indices_t, preds=preds,
                               varlen=(cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k))
    return (o, lse) if return_lse else o
