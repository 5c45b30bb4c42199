"""Dispatch of the scoring kernels: Triton on CUDA, the PyTorch references on CPU, and the shared
selection rules (per-row top-k, cumulative mass) used by the content-based patterns.

``SPARSE_ATTN_SCORING=triton`` forces the Triton kernels (for CPU tests under
``TRITON_INTERPRET=1``); ``=torch`` forces the references.
"""

import contextlib
import contextvars
import os

import torch

from sparse_attn_kernels import reference_scoring as ref

_TRITON_BLOCKS = (16, 32, 64, 128)
# (q_range, kv_range) of the batch being scored (padding), set by :func:`padding`
_PADDING: "contextvars.ContextVar" = contextvars.ContextVar("sparse_attn_scoring_padding", default=None)


@contextlib.contextmanager
def padding(q_range=None, kv_range=None):
    """Inside the block, content patterns score only the valid tokens of each batch row: tiles with no
    valid query or no valid key get score -inf and mass 0, so no budget goes to padding.

    Args:
        q_range, kv_range: int ``[B|1, 2]`` valid ``[start, end)`` per batch row (None: all valid).
    """
    token = _PADDING.set((q_range, kv_range))
    try:
        yield
    finally:
        _PADDING.reset(token)


def valid_tiles(q_len, kv_len, block_m, block_n, device):
    """bool ``[B|1, 1, NQB, NKB]``: tiles holding a valid query and a valid key under :func:`padding`, or None."""
    pad = _PADDING.get()
    if pad is None:
        return None
    q_range, kv_range = pad
    batch = max(1, *(r.shape[0] for r in pad if r is not None))

    def blocks(rng, length, block):
        first = torch.arange(-(-length // block), device=device) * block  # [N]
        last = torch.clamp(first + block, max=length)
        if rng is None:
            return torch.ones((batch, first.numel()), dtype=torch.bool, device=device)
        rng = rng.to(device=device, dtype=torch.int64).expand(batch, 2)
        return (first[None] < rng[:, 1:]) & (last[None] > rng[:, :1])  # [B, N]

    qv, kv = blocks(q_range, q_len, block_m), blocks(kv_range, kv_len, block_n)
    return (qv[:, :, None] & kv[:, None, :])[:, None]


def mask_padding(scores, q_len, kv_len, block_m, block_n, fill):
    """``scores [B, H, NQB, NKB]`` with tiles outside :func:`padding` set to ``fill``."""
    valid = valid_tiles(q_len, kv_len, block_m, block_n, scores.device)
    return scores if valid is None else scores.masked_fill(~valid, fill)


def use_triton(x, *block_sizes) -> bool:
    mode = os.environ.get("SPARSE_ATTN_SCORING", "auto")
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"SPARSE_ATTN_SCORING must be 'auto', 'triton' or 'torch', got {mode!r}.")
    if mode == "torch" or x.dtype == torch.float64 or any(b not in _TRITON_BLOCKS for b in block_sizes):
        return False
    return mode == "triton" or x.is_cuda


def block_mean_pool(x, block):
    if use_triton(x):
        from sparse_attn_kernels.scoring.pool import block_mean_pool as fn
        return fn(x, block)
    return ref.block_mean_pool_ref(x, block)


def pooled_block_scores(q_pool, k_pool, scale, q_len, kv_len, block_m, block_n, causal):
    if use_triton(q_pool):
        from sparse_attn_kernels.scoring.pool import pooled_block_scores as fn
        return fn(q_pool, k_pool, scale, q_len, kv_len, block_m, block_n, causal)
    return ref.pooled_block_scores_ref(q_pool, k_pool, scale, q_len, kv_len, block_m, block_n, causal)


def attention_lse(q, k, scale, causal, kv_start=0):
    if use_triton(q):
        from sparse_attn_kernels.scoring.mass import attention_lse as fn
        return fn(q, k, scale, causal, kv_start)
    return ref.attention_lse_ref(q, k, scale, causal, kv_start)


def block_mass(q, k, lse, block_m, block_n, scale, causal, kv_start=0):
    if use_triton(q, block_m, block_n):
        from sparse_attn_kernels.scoring.mass import block_mass as fn
        return fn(q, k, lse, block_m, block_n, scale, causal, kv_start)
    return ref.block_mass_ref(q, k, lse, block_m, block_n, scale, causal, kv_start)


def vertical_slash_scores(q, k, last_q, scale, causal):
    if use_triton(q) and last_q <= 128:
        from sparse_attn_kernels.scoring.vertical_slash import vertical_slash_scores as fn
        return fn(q, k, last_q, scale, causal)
    return ref.vertical_slash_scores_ref(q, k, last_q, scale, causal)


# ---- budgets and selection rules ---------------------------------------------------------------
def per_head(value, n_heads, name):
    """A scalar or a per-head sequence -> list of ``n_heads`` values."""
    if isinstance(value, (tuple, list)):
        if len(value) not in (1, n_heads):
            raise ValueError(f"{name} must have 1 or {n_heads} entries (one per head selected for), got {len(value)}.")
        return list(value) * (n_heads if len(value) == 1 else 1)
    return [value] * n_heads


def check_budget(value, name, allow_fraction=True):
    """int >= 0, or float in (0, 1] (a fraction), or a per-head sequence of those; returns a tuple or scalar."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be an int, a float fraction or a per-head sequence, got {v!r}.")
        if isinstance(v, float) and not (allow_fraction and 0.0 < v <= 1.0):
            raise ValueError(f"{name} as a float must be a fraction in (0, 1], got {v}.")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}.")
    return tuple(value) if isinstance(value, (tuple, list)) else value


def budget_tensor(value, n_heads, visible, name, device):
    """Per-head, per-row budgets int64 ``[H, NQB]``: ints as given, floats as ``ceil(fraction * visible)``.

    ``visible`` int64 ``[NQB]``: key blocks each query block can see (all of them without causality).
    """
    vals = per_head(value, n_heads, name)
    vis = visible.to(device=device, dtype=torch.float64)
    rows = [torch.ceil(v * vis - 1e-9) if isinstance(v, float) else torch.full_like(vis, int(v)) for v in vals]
    return torch.stack(rows).to(torch.int64)


def topk_rows(scores, k_per_head, forced=None):
    """bool like ``scores [B, H, N, M]``: each row's ``k_per_head[h(, n)]`` largest finite scores (ties: lower
    index first), excluding and then adding ``forced`` tiles. ``k_per_head``: int ``[H]`` or ``[H, N]``."""
    if forced is not None:
        scores = scores.masked_fill(forced, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    k = k_per_head[..., None] if k_per_head.dim() == 3 else k_per_head.reshape(1, scores.shape[1], -1, 1)
    keep = (rank < k) & torch.isfinite(scores)
    return keep if forced is None else keep | forced


def with_anchors(forced, anchors, shape):
    """``(forced | anchors, extra)``: the tiles to keep whatever their score, and ``extra [B|1, H|1, N]`` int64,
    the anchors not already forced (they count toward a budget; forced tiles come on top of it)."""
    if anchors is None:
        return forced, None
    extra = anchors.expand(shape) if forced is None else anchors & ~forced
    return (anchors.expand(shape) if forced is None else forced | anchors), extra.sum(-1)


def topk_anchored(scores, budget, forced=None, anchors=None):
    """:func:`topk_rows` with ``anchors`` (bool ``[NQB, NKB]``) always kept and counted in the ``budget``
    (int ``[H, N]``): each row takes ``max(0, budget - anchors)`` more tiles by score."""
    fz, extra = with_anchors(forced, anchors, scores.shape)
    if extra is None:
        return topk_rows(scores, budget, forced)
    return topk_rows(scores, (budget[None] - extra).clamp_min(0), fz)


def mass_rows(mass, p_per_head, forced=None, min_blocks=1, max_blocks=None):
    """bool: per row, the fewest largest-mass tiles whose share of the row's mass reaches ``p`` (forced tiles
    count toward it), at least ``min_blocks`` and at most ``max_blocks`` chosen tiles.

    Args:
        mass: float ``[B, H, N, M]`` non-negative (0 on invisible tiles).
        p_per_head: float ``[H]``.
    """
    total = mass.sum(-1, keepdim=True).clamp_min(1e-30)
    share = mass / total
    base = (share * forced).sum(-1, keepdim=True) if forced is not None else 0.0
    cand = share.masked_fill(forced, -1.0) if forced is not None else share
    vals, order = torch.sort(cand, dim=-1, descending=True, stable=True)
    before = torch.cumsum(vals.clamp_min(0.0), dim=-1) - vals.clamp_min(0.0) + base
    slot = torch.arange(mass.shape[-1], device=mass.device)
    take = (before < p_per_head.view(1, -1, 1, 1)) | (slot < min_blocks)
    if max_blocks is not None:
        take = take & (slot < max_blocks)
    take = take & (vals > 0)
    keep = torch.zeros_like(take).scatter_(-1, order, take)
    return keep if forced is None else keep | forced
