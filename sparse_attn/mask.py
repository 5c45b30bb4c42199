"""Block-sparse mask format: what a pattern decided, as data that kernels consume.

Normative description: docs/masks.md.
"""

import math
from typing import Tuple

import torch

from ._checks import check_int_tensor, check_positive_int

_ASCII_LIMIT = 64  # block maps up to this many blocks per side are drawn in repr


def _as_pair(block_size, name="block_size") -> Tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2):
        raise TypeError(f"{name} must be an int or a pair (BLOCK_M, BLOCK_N), got {block_size!r}.")
    return (check_positive_int(block_size[0], f"{name}[0]"), check_positive_int(block_size[1], f"{name}[1]"))


def lists_from_bool(block_bool: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise sorted index lists of a boolean map.

    Args:
        block_bool: bool ``[..., N, M]``.

    Returns:
        counts int32 ``[..., N]`` and indices int32 ``[..., N, W]`` with ``W = max(1, max count)``;
        entries past a row's count are 0.
    """
    counts = block_bool.sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max().item()) if counts.numel() else 1)
    if block_bool.shape[-1] == 0:
        return counts, torch.zeros((*block_bool.shape[:-1], width), dtype=torch.int32, device=block_bool.device)
    # stable sort of "not kept" puts kept positions first, in increasing order
    order = torch.sort((~block_bool).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    slot = torch.arange(order.shape[-1], device=block_bool.device)
    indices = torch.where(slot < counts[..., None], order, 0).to(torch.int32)
    if indices.shape[-1] < width:  # fewer columns than the width of 1
        indices = torch.nn.functional.pad(indices, (0, width - indices.shape[-1]))
    return counts, indices.contiguous()


class TiledMask:
    """Geometry shared by the mask types: ``block_size``, ``seq_lens`` and a lead tensor ``[Bm, Hm, NQB]``."""

    block_size: Tuple[int, int]
    seq_lens: Tuple[int, int]

    def _lead(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def q_len(self) -> int:
        return self.seq_lens[0]

    @property
    def kv_len(self) -> int:
        return self.seq_lens[1]

    @property
    def num_blocks(self) -> Tuple[int, int]:
        """``(NQB, NKB)``."""
        return (math.ceil(self.q_len / self.block_size[0]), math.ceil(self.kv_len / self.block_size[1]))

    @property
    def device(self) -> torch.device:
        return self._lead().device

    @property
    def batch_heads(self) -> Tuple[int, int]:
        """``(Bm, Hm)``: 1 means broadcast."""
        return tuple(self._lead().shape[:2])


class BlockSparseMask(TiledMask):
    """Which (query block, key block) tiles attention computes, per batch and head.

    Attributes:
        counts: int32 ``[Bm, Hm, NQB]``, ``Bm`` in ``(1, B)``, ``Hm`` in ``(1, Hkv, Hq)``.
        indices: int32 ``[Bm, Hm, NQB, W]``, each row's first ``counts`` entries are the
            kept key blocks in strictly increasing order; the rest is padding (0).
        block_size: ``(BLOCK_M, BLOCK_N)``.
        seq_lens: ``(q_len, kv_len)``; the last block of either side may be ragged.

    Example:
        >>> keep = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)[None, None]
        >>> mask = BlockSparseMask.from_dense(keep, block_size=64, seq_lens=(100, 128))
        >>> mask.counts.tolist()
        [[[1, 2]]]
    """

    def __init__(self, counts, indices, block_size, seq_lens, *, validate: bool = True):
        self.block_size = _as_pair(block_size)
        if not (isinstance(seq_lens, (tuple, list)) and len(seq_lens) == 2):
            raise TypeError(f"seq_lens must be a pair (q_len, kv_len), got {seq_lens!r}.")
        self.seq_lens = (check_positive_int(seq_lens[0], "seq_lens[0]", allow_zero=True),
                         check_positive_int(seq_lens[1], "seq_lens[1]", allow_zero=True))
        check_int_tensor(counts, "counts", ndim=3)
        check_int_tensor(indices, "indices", ndim=4)
        self.counts = counts.to(torch.int32).contiguous()
        self.indices = indices.to(torch.int32).contiguous()
        self._kv_major = None
        if validate:
            self.validate()

    # ---- constructors ---------------------------------------------------------------
    @classmethod
    def from_dense(cls, block_bool, block_size, seq_lens=None):
        """Build from a boolean block map ``[B|1, H|1, ceil(Lq/BLOCK_M), ceil(Lk/BLOCK_N)]``.

        ``seq_lens`` defaults to full blocks (``NQB*BLOCK_M, NKB*BLOCK_N``).
        """
        if not isinstance(block_bool, torch.Tensor):
            raise TypeError(f"block_bool must be a torch.Tensor, got {type(block_bool).__name__}.")
        if block_bool.dim() != 4:
            raise ValueError(f"block_bool must have shape [B|1, H|1, NQB, NKB], got {list(block_bool.shape)}.")
        bm, bn = _as_pair(block_size)
        if seq_lens is None:
            seq_lens = (block_bool.shape[2] * bm, block_bool.shape[3] * bn)
        expected = (math.ceil(seq_lens[0] / bm), math.ceil(seq_lens[1] / bn))
        if tuple(block_bool.shape[2:]) != expected:
            raise ValueError(
                f"block_bool must have {expected[0]} x {expected[1]} blocks for seq_lens={tuple(seq_lens)} and "
                f"block_size={(bm, bn)}, got {tuple(block_bool.shape[2:])}.")
        counts, indices = lists_from_bool(block_bool.to(torch.bool))
        return cls(counts, indices, (bm, bn), seq_lens, validate=False)

    @classmethod
    def full(cls, q_len, kv_len, block_size=64, device=None):
        """Every block kept (dense attention), broadcast over batch and heads."""
        bm, bn = _as_pair(block_size)
        keep = torch.ones((1, 1, math.ceil(q_len / bm), math.ceil(kv_len / bn)), dtype=torch.bool, device=device)
        return cls.from_dense(keep, (bm, bn), (q_len, kv_len))

    @classmethod
    def from_flex_block_mask(cls, block_mask, *, partial="error"):
        """Convert a ``torch.nn.attention.flex_attention.BlockMask``.

        Full blocks are kept. Partial blocks carry a token predicate (``mask_mod``) that a
        block mask cannot express: ``partial="error"`` (default) refuses them unless the
        ``mask_mod`` is the no-op mask; ``partial="keep"`` keeps them whole (pass
        ``causal=True`` to :func:`sparse_attention` if the predicate was causal).
        """
        from torch.nn.attention.flex_attention import noop_mask
        if partial not in ("error", "keep"):
            raise ValueError(f"partial must be 'error' or 'keep', got {partial!r}.")
        bm, bn = block_mask.BLOCK_SIZE
        q_len, kv_len = block_mask.seq_lengths
        n_qb, n_kb = math.ceil(q_len / bm), math.ceil(kv_len / bn)

        def scatter(num, idx):
            keep = torch.zeros((*num.shape, n_kb + 1), dtype=torch.bool, device=num.device)
            slot = torch.arange(idx.shape[-1], device=num.device)
            ok = slot < num[..., None]
            target = torch.where(ok, idx.long().clamp(0, n_kb), n_kb)
            return keep.scatter_(-1, target, True)[..., :n_kb]

        part = scatter(block_mask.kv_num_blocks, block_mask.kv_indices)[:, :, :n_qb]
        if block_mask.full_kv_num_blocks is not None:
            whole = scatter(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)[:, :, :n_qb]
            has_partial = bool(part.any()) and block_mask.mask_mod is not noop_mask
            keep = part | whole
        else:
            has_partial = block_mask.mask_mod is not noop_mask
            keep = part
        if has_partial and partial == "error":
            raise ValueError(
                "block_mask has partial blocks whose token predicate (mask_mod) a BlockSparseMask cannot "
                "express; pass partial='keep' to keep those blocks whole (and causal=True to sparse_attention "
                "if the predicate was causal).")
        return cls.from_dense(keep, (bm, bn), (q_len, kv_len))

    # ---- views --------------------------------------------------------------------------
    def _lead(self) -> torch.Tensor:
        return self.counts

    def to(self, device) -> "BlockSparseMask":
        """A copy on ``device`` (self when already there)."""
        if torch.device(device) == self.device:
            return self
        return BlockSparseMask(self.counts.to(device), self.indices.to(device), self.block_size, self.seq_lens,
                               validate=False)

    def to_block_dense(self) -> torch.Tensor:
        """bool ``[Bm, Hm, NQB, NKB]``: True where a tile is kept."""
        n_kb = self.num_blocks[1]
        slot = torch.arange(self.indices.shape[-1], device=self.device)
        ok = slot < self.counts[..., None]
        target = torch.where(ok, self.indices.long(), n_kb)
        keep = torch.zeros((*self.counts.shape, n_kb + 1), dtype=torch.bool, device=self.device)
        return keep.scatter_(-1, target, True)[..., :n_kb]

    def to_dense(self, causal: bool = False) -> torch.Tensor:
        """Token-level bool ``[Bm, Hm, Lq, Lk]`` (for tests and small inputs).

        With ``causal`` the bottom-right causal predicate is ANDed in, as in :func:`sparse_attention`.
        """
        bm, bn = self.block_size
        tok = self.to_block_dense().repeat_interleave(bm, dim=2)[:, :, : self.q_len]
        tok = tok.repeat_interleave(bn, dim=3)[..., : self.kv_len]
        if causal:
            i = torch.arange(self.q_len, device=self.device)[:, None]
            j = torch.arange(self.kv_len, device=self.device)[None, :]
            tok = tok & (j <= i + (self.kv_len - self.q_len))
        return tok

    def density(self, causal: bool = False) -> float:
        """Share of the (query, key) token pairs that attention computes, averaged over (Bm, Hm)."""
        if self.q_len == 0 or self.kv_len == 0 or self.counts.numel() == 0:
            return 0.0
        bm, bn = self.block_size
        rows = torch.clamp(self.q_len - torch.arange(self.num_blocks[0], device=self.device) * bm, max=bm)
        if not causal:
            slot = torch.arange(self.indices.shape[-1], device=self.device)
            ok = slot < self.counts[..., None]
            cols = torch.clamp(self.kv_len - self.indices.long() * bn, max=bn) * ok  # [Bm, Hm, NQB, W]
            pairs = (cols.sum(-1) * rows).sum().item()
            return pairs / (self.counts.shape[0] * self.counts.shape[1] * self.q_len * self.kv_len)
        return self.to_dense(causal=True).float().mean().item()

    def kv_major(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Key-major (transposed) lists for the backward pass, derived once and cached.

        Returns:
            counts int32 ``[Bm, Hm, NKB]`` and sorted query-block indices int32 ``[Bm, Hm, NKB, Wt]``.
        """
        if self._kv_major is None:
            self._kv_major = transpose_lists(self.counts, self.indices, self.num_blocks[1])
        return self._kv_major

    # ---- checks and printing -----------------------------------------------------------
    def validate(self) -> "BlockSparseMask":
        """Check shapes and index values; raise ``ValueError`` naming what is wrong."""
        n_qb, n_kb = self.num_blocks
        if self.counts.shape[2] != n_qb:
            raise ValueError(f"counts must have {n_qb} query blocks for q_len={self.q_len} and "
                             f"BLOCK_M={self.block_size[0]}, got shape {list(self.counts.shape)}.")
        if tuple(self.indices.shape[:3]) != tuple(self.counts.shape):
            raise ValueError(f"indices must have shape {list(self.counts.shape)} + [W], "
                             f"got {list(self.indices.shape)}.")
        if self.indices.device != self.counts.device:
            raise ValueError(f"indices and counts must be on one device, got {self.indices.device} "
                             f"and {self.counts.device}.")
        width = self.indices.shape[3]
        if self.counts.numel() == 0:
            return self
        lo, hi = int(self.counts.min()), int(self.counts.max())
        if lo < 0 or hi > min(width, n_kb):
            raise ValueError(f"counts must lie in [0, min(W={width}, NKB={n_kb})], got values in [{lo}, {hi}].")
        ok = torch.arange(width, device=self.device) < self.counts[..., None]
        bad = ok & ((self.indices < 0) | (self.indices >= n_kb))
        if bool(bad.any()):
            raise ValueError(f"indices must lie in [0, NKB={n_kb}) for kv_len={self.kv_len} and "
                             f"BLOCK_N={self.block_size[1]}, got {int(self.indices[bad][0])}.")
        rising = self.indices[..., 1:] > self.indices[..., :-1]
        if bool((ok[..., 1:] & ~rising).any()):
            raise ValueError("indices must be strictly increasing within each row's first counts entries.")
        return self

    def __repr__(self) -> str:
        n_qb, n_kb = self.num_blocks
        head = (f"BlockSparseMask(batch_heads={self.batch_heads}, seq_lens={self.seq_lens}, "
                f"block_size={self.block_size}, blocks={n_qb}x{n_kb}, width={self.indices.shape[-1]}, "
                f"density={self.density():.3f}, device={self.device})")
        if self.counts.numel() == 0 or n_qb > _ASCII_LIMIT or n_kb > _ASCII_LIMIT:
            return head
        rows = self.to_block_dense()[0, 0].cpu()
        art = "\n".join("  " + "".join("#" if x else "." for x in r.tolist()) for r in rows)
        return f"{head}\n[batch 0, head 0]\n{art}"


def transpose_lists(counts, indices, n_kb):
    """Query-major lists -> key-major lists, vectorized (sort of the kept entries).

    Args:
        counts: int32 ``[Bm, Hm, NQB]``; indices: int32 ``[Bm, Hm, NQB, W]``; n_kb: number of key blocks.

    Returns:
        counts_t int32 ``[Bm, Hm, NKB]`` and indices_t int32 ``[Bm, Hm, NKB, Wt]`` (sorted query blocks).
    """
    bm_, hm_, n_qb, width = indices.shape
    device = indices.device
    ok = torch.arange(width, device=device) < counts[..., None]  # [Bm, Hm, NQB, W]
    q_blk = torch.arange(n_qb, device=device)[:, None].expand(n_qb, width)
    # key k*NQB + q orders entries by key block, then query block; dropped slots sort last
    key = torch.where(ok, indices.long() * n_qb + q_blk, n_kb * n_qb).reshape(bm_, hm_, -1)
    key = torch.sort(key, dim=-1).values
    counts_t = torch.zeros((bm_, hm_, n_kb + 1), dtype=torch.int64, device=device)
    counts_t.scatter_add_(-1, key // max(n_qb, 1) if n_qb else key, torch.ones_like(key))
    counts_t = counts_t[..., :n_kb]
    width_t = max(1, int(counts_t.max().item()) if counts_t.numel() else 1)
    starts = torch.cumsum(counts_t, -1) - counts_t  # [Bm, Hm, NKB]
    kept = key < n_kb * n_qb
    kb = torch.where(kept, key // max(n_qb, 1), 0)
    rank = torch.arange(key.shape[-1], device=device) - torch.gather(starts, -1, kb)
    out = torch.zeros((bm_, hm_, n_kb * width_t + 1), dtype=torch.int32, device=device)
    pos = torch.where(kept, kb * width_t + rank, n_kb * width_t)
    out.scatter_(-1, pos, (key % max(n_qb, 1)).to(torch.int32))
    indices_t = out[..., :-1].reshape(bm_, hm_, n_kb, width_t)
    return counts_t.to(torch.int32).contiguous(), indices_t.contiguous()
