"""From token-level predicates to tiles: which tiles are kept, which are full, and the bits of the others.

Used by the :class:`~sparse_attn.BlockSparseMask` constructors that take a token mask, a FlexAttention
``mask_mod`` or a FlexAttention ``BlockMask``. Pure tensor code: no kernels, no masks.
"""

from typing import Callable, Tuple

import torch

from sparse_attn_kernels._common.predicates import pack_bits

#: elements of token predicate evaluated per chunk
EVAL_CHUNK_ELEMS = 1 << 24


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


def compact_rows(keep, *values, fill=0, min_width=1):
    """Row-wise compaction of each of ``values`` where ``keep`` (all ``[..., N]``), order preserved.

    Returns (counts int64 ``[...]``, then one packed ``[..., W]`` tensor per value, padded with ``fill``),
    ``W = max(min_width, max count)``.
    """
    counts = keep.sum(-1)
    width = max(min_width, int(counts.max().item()) if counts.numel() else 0)
    target = torch.where(keep, torch.cumsum(keep, dim=-1) - 1, width)  # kept entries to their slot, others spare
    packed = []
    for val in values:
        out = torch.full((*keep.shape[:-1], width + 1), fill, dtype=val.dtype, device=keep.device)
        packed.append(out.scatter_(-1, target, val.expand_as(keep))[..., :width])
    return (counts, *packed)


def _vmap_bhqkv(mask_mod: Callable):
    """``mask_mod(b, h, q, kv)`` on scalars -> a function of 1-D index tensors returning ``[B, H, Q, KV]``
    (the way FlexAttention evaluates a ``mask_mod``)."""
    fn = mask_mod
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
        fn = torch.vmap(fn, in_dims=dims, out_dims=0)
    return fn


def _vmap_tiles(mask_mod: Callable):
    """``mask_mod`` -> a function of per-tile indices ``b [P], h [P], q [P, M], kv [P, N]`` -> ``[P, M, N]``."""
    fn = torch.vmap(mask_mod, in_dims=(None, None, None, 0), out_dims=0)
    fn = torch.vmap(fn, in_dims=(None, None, 0, None), out_dims=0)
    return torch.vmap(fn, in_dims=(0, 0, 0, 0), out_dims=0)


def eval_mask_mod(mask_mod: Callable, batch: int, heads: int, q_rows: torch.Tensor, kv_len: int, device):
    """bool ``[batch, heads, len(q_rows), kv_len]``: the ``mask_mod`` on a band of query rows."""
    b = torch.arange(batch, device=device)
    h = torch.arange(heads, device=device)
    kv = torch.arange(kv_len, device=device)
    return _vmap_bhqkv(mask_mod)(b, h, q_rows.to(device), kv).to(torch.bool)


def eval_mask_mod_tiles(mask_mod: Callable, b, h, qb, kb, block_size, seq_lens):
    """bool ``[P, BLOCK_M, BLOCK_N]``: the ``mask_mod`` on the tiles ``(b, h, qb, kb)`` (int64 ``[P]`` each),
    False at positions past the lengths (the ``mask_mod`` sees only valid positions)."""
    bm, bn = block_size
    q_len, kv_len = seq_lens
    device = qb.device
    rows = qb[:, None] * bm + torch.arange(bm, device=device)  # [P, BM]
    cols = kb[:, None] * bn + torch.arange(bn, device=device)  # [P, BN]
    valid = (rows < q_len)[:, :, None] & (cols < kv_len)[:, None, :]
    fn = _vmap_tiles(mask_mod)
    out = torch.zeros((qb.numel(), bm, bn), dtype=torch.bool, device=device)
    step = max(1, EVAL_CHUNK_ELEMS // (bm * bn))
    for a in range(0, qb.numel(), step):
        sl = slice(a, a + step)
        got = fn(b[sl], h[sl], rows[sl].clamp(max=max(q_len - 1, 0)), cols[sl].clamp(max=max(kv_len - 1, 0)))
        out[sl] = got.to(torch.bool)
    return out & valid, valid


class TileAccumulator:
    """Reduces token masks, one band of query blocks at a time, into kept tiles, full tiles and the bits
    of the partial ones."""

    def __init__(self, lead, n_blocks, block_size, device):
        self.bm, self.bn = block_size
        self.keep = torch.zeros((*lead, *n_blocks), dtype=torch.bool, device=device)  # [Bm, Hm, NQB, NKB]
        self.slot = torch.full((*lead, *n_blocks), -1, dtype=torch.int64, device=device)
        self.words = []
        self.n_slots = 0

    def add_rows(self, qb0, tok):
        """``tok`` bool ``[Bm, Hm, rows, Lk]``: the token mask of the query rows from block ``qb0`` on."""
        bm, bn = self.bm, self.bn
        lead, (rows, kv_len) = tok.shape[:2], tok.shape[2:]
        n_qb, n_kb = -(-rows // bm), -(-kv_len // bn)
        row_ok = torch.arange(n_qb * bm, device=tok.device) < rows
        col_ok = torch.arange(n_kb * bn, device=tok.device) < kv_len
        valid = (row_ok[:, None] & col_ok[None, :]).view(n_qb, bm, n_kb, bn).permute(0, 2, 1, 3)  # [nq, nk, bm, bn]
        t = torch.nn.functional.pad(tok, (0, n_kb * bn - kv_len, 0, n_qb * bm - rows))
        t = t.view(*lead, n_qb, bm, n_kb, bn).permute(0, 1, 2, 4, 3, 5) & valid  # [Bm, Hm, nq, nk, bm, bn]
        index = torch.meshgrid(*(torch.arange(n, device=tok.device) for n in (*lead, n_qb, n_kb)), indexing="ij")
        index = (index[0], index[1], index[2] + qb0, index[3])
        self.add_tiles(tuple(x.reshape(-1) for x in index), t.reshape(-1, bm, bn),
                       valid.expand_as(t).reshape(-1, bm, bn))

    def add_tiles(self, index, tiles, valid):
        """Tiles given one by one: ``index`` = ``(b, h, qb, kb)`` int64 ``[P]`` each, ``tiles`` bool
        ``[P, BM, BN]`` (False where invalid): a tile with no kept pair is dropped, one that keeps every valid
        pair is full, the others keep their bits."""
        any_ = tiles.flatten(1).any(1)
        all_ = (tiles | ~valid).flatten(1).all(1)
        part = any_ & ~all_
        b, h, qb, kb = index
        self.keep[b[any_], h[any_], qb[any_], kb[any_]] = True
        n = int(part.sum())
        if n:
            self.slot[b[part], h[part], qb[part], kb[part]] = torch.arange(
                self.n_slots, self.n_slots + n, device=tiles.device)
            self.words.append(pack_bits(tiles[part]))
            self.n_slots += n

    def result(self):
        """``(counts, indices, bit_slots or None, bit_words or None)`` in the list layout."""
        counts, indices = lists_from_bool(self.keep)
        if self.n_slots == 0:
            return counts, indices, None, None
        ok = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
        slots = torch.gather(self.slot, -1, indices.long()).masked_fill(~ok, -1).to(torch.int32)
        return counts, indices, slots.contiguous(), torch.cat(self.words).contiguous()


def ranges_from_attention_mask(attention_mask: torch.Tensor, name: str = "attention_mask") -> torch.Tensor:
    """int32 ``[B, 2]`` valid ``[start, end)`` of a 2-D padding mask (left or right padding).

    Args:
        attention_mask: bool or 0/1 ``[B, L]``, True/1 at real tokens, one contiguous run per row.

    Raises:
        ValueError when a row's real tokens are not one contiguous run (then it is no padding mask).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"{name} must be a [B, L] tensor, got "
                         f"{list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__}.")
    real = attention_mask.to(torch.bool)
    pos = torch.arange(real.shape[1], device=real.device)
    n = real.sum(1)
    start = torch.where(real, pos, real.shape[1]).amin(1)
    end = torch.where(real, pos + 1, 0).amax(1)
    start = torch.where(n > 0, start, 0)
    end = torch.where(n > 0, end, 0)
    if bool((end - start != n).any()):
        raise ValueError(f"{name} must mark one contiguous run of real tokens per row (left or right padding), "
                         f"got a row with holes.")
    return torch.stack([start, end], 1).to(torch.int32)


def ranges_from_lengths(lengths, total: int, side: str = "right") -> torch.Tensor:
    """int32 ``[B, 2]`` for sequences of ``lengths [B]`` padded to ``total`` on the ``side`` (``"right"``:
    real tokens first; ``"left"``: padding first)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
    lengths = torch.as_tensor(lengths).to(torch.int64)
    if lengths.dim() != 1 or bool((lengths < 0).any()) or bool((lengths > total).any()):
        raise ValueError(f"lengths must be a 1-D tensor of values in [0, {total}], got {lengths.tolist()}.")
    start = torch.zeros_like(lengths) if side == "right" else total - lengths
    return torch.stack([start, start + lengths], 1).to(torch.int32)
