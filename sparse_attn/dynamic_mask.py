"""Trainable Dynamic Mask Attention (DMA; SmallDoges/flash-dmattn): a per-key bias learned from the values
selects each row's keys and is added to their scores.

For key ``j`` and query head ``h``: ``bias[h, j] = A_h * softplus(W v_j)_h`` (the same for every query), where
``v_j`` is the token's values over all kv heads. Each query row keeps the ``keep`` visible keys of largest bias
(with ``causal``, among keys ``j <= i + Lk - Lq``; ties at the threshold are all kept), and attention is
``softmax(scale * q k^T + bias)`` over the kept keys: ``sparse_attention(..., mask, key_bias=bias)``, so the
gradient reaches ``W`` and ``A`` through the bias of the kept keys (the selection itself is not differentiable).

The selection is token-exact: a :class:`BlockSparseMask` with bit masks in the tiles a row keeps only partly.
The per-row threshold (the ``keep``-th largest visible bias) costs ``O(Lq * Lk)`` comparisons per head, done
in bounded chunks of rows; rows share a key set up to the causal edge, so consecutive rows mostly hit the same
tiles.

Example:
    >>> dma = DynamicMaskAttention(num_heads=4, num_kv_heads=2, head_dim=32, keep=64)
    >>> q, k, v = torch.randn(1, 4, 256, 32), torch.randn(1, 2, 256, 32), torch.randn(1, 2, 256, 32)
    >>> dma(q, k, v).shape
    torch.Size([1, 4, 256, 32])
"""

import json
import math

import torch
from torch import nn

from ._checks import check_bool, check_positive_int
from .mask import BlockSparseMask, _as_pair
from .ops import sparse_attention

# Bound, in elements, of the [B, H, rows, Lk] temporaries of the threshold computation.
CHUNK_ELEMS = 1 << 24


def row_thresholds(bias, q_len, keep, causal):
    """Per query row, the ``keep``-th largest bias among its visible keys (``-inf`` when it sees ``<= keep``).

    Args:
        bias: float ``[B, H, Lk]``; q_len: queries; keep: keys per row; causal: bottom-right causal.

    Returns:
        float ``[B, H, Lq]`` (``[B, H, 1]`` broadcast over rows without ``causal``).
    """
    batch, heads, kv_len = bias.shape
    if not causal:
        if kv_len <= keep:
            return bias.new_full((batch, heads, 1), float("-inf"))
        return torch.topk(bias, keep, dim=-1).values[..., -1:]
    shift = kv_len - q_len
    out = bias.new_full((batch, heads, q_len), float("-inf"))
    rows = torch.arange(q_len, device=bias.device)
    seen = torch.clamp(rows + shift + 1, 0, kv_len)  # [Lq] visible keys per row
    need = (seen > keep).nonzero().flatten()  # rows that see more keys than they keep
    if need.numel() == 0:
        return out
    step = max(1, CHUNK_ELEMS // max(1, batch * heads * kv_len))
    cols = torch.arange(kv_len, device=bias.device)
    for a in range(0, need.numel(), step):
        r = need[a:a + step]  # [C]
        visible = cols[None, :] < seen[r, None]  # [C, Lk]
        masked = torch.where(visible, bias[:, :, None, :], float("-inf"))  # [B, H, C, Lk]
        out[:, :, r] = torch.topk(masked, keep, dim=-1).values[..., -1]
    return out


def dynamic_mask(bias, q_len, keep, *, causal=True, block_size=64) -> BlockSparseMask:
    """The token-exact DMA selection: query ``i`` keeps key ``j`` iff ``j`` is visible and ``bias[.., j]`` is at
    least the row's ``keep``-th largest visible bias.

    Args:
        bias: float ``[B, H, Lk]`` key bias (detached for the selection); q_len: ``Lq``; keep: keys per row.
        causal: bottom-right causal (``j <= i + Lk - Lq``); block_size: tiles of the mask.

    Returns:
        :class:`BlockSparseMask` ``[B, H]`` for ``(Lq, Lk)``, bit masks in the partly kept tiles.
    """
    if not isinstance(bias, torch.Tensor) or bias.dim() != 3 or not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor [B, H, Lk], got "
                         f"{list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}.")
    q_len = check_positive_int(q_len, "q_len")
    keep = check_positive_int(keep, "keep")
    check_bool(causal, "causal")
    bm, bn = _as_pair(block_size)
    bias = bias.detach().float()
    if bool(torch.isnan(bias).any()):
        raise ValueError("bias holds NaN: the key selection is undefined.")
    batch, heads, kv_len = bias.shape
    thr = row_thresholds(bias, q_len, keep, causal).expand(batch, heads, q_len)  # [B, H, Lq]
    n_qb, n_kb = math.ceil(q_len / bm), math.ceil(kv_len / bn)
    shift = kv_len - q_len
    pad_b = torch.nn.functional.pad(bias, (0, n_kb * bn - kv_len), value=float("-inf")).reshape(batch, heads, n_kb, bn)
    pad_t = torch.nn.functional.pad(thr, (0, n_qb * bm - q_len), value=float("inf")).reshape(batch, heads, n_qb, bm)
    # a tile may hold a kept pair iff its largest bias reaches its rows' smallest threshold (and it is visible)
    tiles = pad_b.amax(-1)[:, :, None, :] >= pad_t.amin(-1)[:, :, :, None]  # [B, H, NQB, NKB]
    if causal:
        q_last = torch.clamp(torch.arange(n_qb, device=bias.device) * bm + bm, max=q_len) - 1
        k_first = torch.arange(n_kb, device=bias.device) * bn
        tiles = tiles & (k_first[None, :] <= q_last[:, None] + shift)

    def evaluate(b, h, qb, kb):
        rows = qb[:, None] * bm + torch.arange(bm, device=qb.device)  # [P, BM]
        cols = kb[:, None] * bn + torch.arange(bn, device=qb.device)  # [P, BN]
        t = thr[b[:, None], h[:, None], rows.clamp(max=q_len - 1)]  # [P, BM]
        s = bias[b[:, None], h[:, None], cols.clamp(max=kv_len - 1)]  # [P, BN]
        ok = s[:, None, :] >= t[:, :, None]  # [P, BM, BN]
        if causal:
            ok = ok & (cols[:, None, :] <= rows[:, :, None] + shift)
        return ok

    return BlockSparseMask.from_tile_evaluator(evaluate, tiles, (bm, bn), (q_len, kv_len))


class DynamicMaskAttention(nn.Module):
    """DMA as a module: its parameters make the key bias; :meth:`forward` selects and attends.

    Args:
        num_heads, num_kv_heads, head_dim: attention shape (``num_heads % num_kv_heads == 0``).
        keep: keys per query row (2048 in the paper's recipe).
        block_size: tiles of the selection mask.
        causal: bottom-right causal attention.

    Parameters: ``value_proj`` (``Linear(num_kv_heads * head_dim -> num_heads)``, the ``W`` of the bias) and
    ``A`` ``[num_heads]`` (initialized to 1).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, keep: int = 2048, block_size=64,
                 causal: bool = True):
        super().__init__()
        self.num_heads = check_positive_int(num_heads, "num_heads")
        self.num_kv_heads = check_positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}).")
        self.head_dim = check_positive_int(head_dim, "head_dim")
        self.keep = check_positive_int(keep, "keep")
        self.block_size = _as_pair(block_size)
        self.causal = check_bool(causal, "causal")
        self.value_proj = nn.Linear(num_kv_heads * head_dim, num_heads)
        self.A = nn.Parameter(torch.ones(num_heads))

    def key_bias(self, v):
        """``[B, H, Lk]`` float bias from ``v [B, Hkv, Lk, D]``: ``A_h * softplus(W v_j)_h``."""
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[1:2] + v.shape[3:]) != (
                self.num_kv_heads, self.head_dim):
            raise ValueError(f"v must have shape [B, {self.num_kv_heads}, Lk, {self.head_dim}], got "
                             f"{list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}.")
        tokens = v.transpose(1, 2).reshape(v.shape[0], v.shape[2], -1)  # [B, Lk, Hkv*D]
        w = self.value_proj.weight.to(v.dtype)
        b = self.value_proj.bias.to(v.dtype)
        gate = torch.nn.functional.softplus(torch.nn.functional.linear(tokens, w, b))  # [B, Lk, H]
        return (self.A.to(v.dtype) * gate).transpose(1, 2).float()  # [B, H, Lk]

    def select(self, bias, q_len) -> BlockSparseMask:
        """The selection mask of ``bias [B, H, Lk]`` for ``q_len`` queries (no gradient)."""
        return dynamic_mask(bias, q_len, self.keep, causal=self.causal, block_size=self.block_size)

    def forward(self, q, k, v, *, scale=None, backend="auto", return_mask=False):
        """Attention ``[B, H, Lq, D]`` over each row's selected keys with the bias added (and the mask)."""
        bias = self.key_bias(v)
        mask = self.select(bias, q.shape[2])
        o = sparse_attention(q, k, v, mask, causal=self.causal, scale=scale, backend=backend, key_bias=bias)
        return (o, mask) if return_mask else o

    def config(self) -> dict:
        """The constructor arguments (JSON-serializable); ``DynamicMaskAttention(**config)`` rebuilds it."""
        return dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                    keep=self.keep, block_size=list(self.block_size), causal=self.causal)

    def to_json(self) -> str:
        return json.dumps(self.config())

    @classmethod
    def from_json(cls, text) -> "DynamicMaskAttention":
        """A new module (fresh parameters) with the configuration of :meth:`to_json`."""
        cfg = json.loads(text) if isinstance(text, str) else dict(text)
        return cls(**cfg)


__all__ = ["DynamicMaskAttention", "dynamic_mask", "row_thresholds"]
