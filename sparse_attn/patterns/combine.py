"""Combining patterns into one mask: unions (always-kept regions) and per-head choices.

Both produce one block map and one :class:`~sparse_attn.BlockSparseMask`, so the mixed mask
runs as a single kernel launch. A per-head choice that includes patterns without a block map
(routing, stripes) becomes a :class:`~sparse_attn.head_groups.HeadGroupsMask`: the block-map heads
still share one launch, each other pattern runs as one more launch on its heads.
"""

from dataclasses import dataclass
from typing import Tuple

import torch

from ..head_groups import HeadGroupsMask, select_heads
from ..mask import BlockSparseMask
from .base import Pattern, as_pattern, check_qk, register
from .static import Skip


def _same_blocks(patterns, name):
    sizes = {p.block_pair for p in patterns}
    if len(sizes) != 1:
        raise ValueError(f"{name} members must share one block_size, got {sorted(sizes)}.")
    return sizes.pop()


def _as_patterns(value, name):
    if not isinstance(value, (tuple, list)) or not value:
        raise TypeError(f"{name} must be a non-empty sequence of patterns, got {value!r}.")
    return tuple(as_pattern(p, f"{name}[{i}]") for i, p in enumerate(value))


@register("union")
@dataclass(frozen=True)
class Union(Pattern):
    """Tiles kept by any member. Structural members are built first and passed to the content-based ones
    as forced tiles, so a top-k budget is spent on the remaining tiles (always-kept sinks, text tokens or the
    diagonal come on top of the budget).

    Example:
        >>> pat = Union(patterns=(SinkLocal(sink=64, window=64), BlockTopK(k=4)))
        >>> pat = SinkLocal(sink=64, window=64) | BlockTopK(k=4)  # the same
    """

    patterns: Tuple = ()

    def __post_init__(self):
        pats = _as_patterns(self.patterns, "patterns")
        flat = []
        for p in pats:  # (a | b) | c -> one flat union
            flat.extend(p.patterns if isinstance(p, Union) else (p,))
        object.__setattr__(self, "patterns", tuple(flat))
        _same_blocks(self.patterns, "union")

    @property
    def block_size(self):
        return self.patterns[0].block_size

    @property
    def structural(self):
        return all(p.structural for p in self.patterns)

    def to_dict(self) -> dict:
        return {"name": self.name, "patterns": [p.to_dict() for p in self.patterns]}

    def mask_mod_for(self, q_len=None, kv_len=None, layout=None):
        """OR of the members' predicates (structural unions only)."""
        if not self.structural:
            raise TypeError("mask_mod exists only for unions of structural patterns.")
        mods = [p.mask_mod_for(q_len, kv_len, layout) for p in self.patterns]

        def mask_mod(b, h, q_idx, kv_idx):
            out = mods[0](b, h, q_idx, kv_idx)
            for m in mods[1:]:
                out = out | m(b, h, q_idx, kv_idx)
            return out
        return mask_mod

    @property
    def mask_mod(self):
        return self.mask_mod_for()

    def block_map_for(self, q_len, kv_len, *, causal=False, layout=None, device=None):
        """bool ``[1, 1, NQB, NKB]`` from lengths alone (structural unions only)."""
        if not self.structural:
            raise TypeError("block_map_for/build_for exist only for unions of structural patterns.")
        keep = None
        for p in self.patterns:
            m = p.block_map_for(q_len, kv_len, causal=causal, layout=layout, device=device)
            keep = m if keep is None else keep | m
        return keep

    def build_for(self, q_len, kv_len, *, causal=False, layout=None, device=None):
        """The mask from lengths alone (structural unions only)."""
        keep = self.block_map_for(q_len, kv_len, causal=causal, layout=layout, device=device)
        return BlockSparseMask.from_dense(keep, self.block_pair, (q_len, kv_len))

    @property
    def token_exact(self):
        return any(p.token_exact for p in self.patterns)

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        keep = forced
        for p in sorted(self.patterns, key=lambda p: not p.structural):
            keep = p.block_map(q, k, causal=causal, layout=layout, forced=keep)
        return keep

    def build(self, q, k, *, causal=False, layout=None):
        """Tile-granular unless a member is token-exact: then its pairs stay exact, and a tile kept whole
        by another member (or full in an exact member) is full."""
        if not self.token_exact:
            return super().build(q, k, causal=causal, layout=layout)
        check_qk(q, k)
        keep = full = None
        exact = []
        for p in sorted(self.patterns, key=lambda p: not p.structural):
            if p.token_exact:
                m = p.build(q, k, causal=causal, layout=layout)
                exact.append(m)
                tiles, whole = m.to_block_dense(), m.full_tiles()
                keep = tiles if keep is None else keep | tiles
            else:
                new = p.block_map(q, k, causal=causal, layout=layout, forced=keep)
                whole = new if keep is None else new & ~keep  # the tiles this member added: kept whole
                keep = new
            full = whole if full is None else full | whole
        shape = torch.broadcast_shapes(keep.shape, full.shape)

        def tokens(b, h, qb, kb):
            out = exact[0].tile_tokens(b, h, qb, kb)
            for m in exact[1:]:
                out = out | m.tile_tokens(b, h, qb, kb)
            return out

        shared = all(m.counts.shape[:2] == (1, 1) and m.predicate_batch <= 1 for m in exact)
        n_kb = keep.shape[-1]

        def evaluate(b, h, qb, kb):
            if not shared:
                return tokens(b, h, qb, kb)
            # exact members the same for every batch row and head: each tile position evaluated once
            pos, inv = torch.unique(qb * n_kb + kb, return_inverse=True)
            zero = torch.zeros_like(pos)
            return tokens(zero, zero, pos // n_kb, pos % n_kb)[inv]
        return BlockSparseMask.from_tile_evaluator(evaluate, keep.expand(shape), self.block_pair,
                                                   (q.shape[2], k.shape[2]), full=full.expand(shape))


@register("per_head")
@dataclass(frozen=True)
class PerHead(Pattern):
    """A pattern per query head (Sparse-vDiT-style head modes: e.g. ``Dense()``, ``Skip()``, a window, a
    top-k with its own budget), merged into one mask with ``Hq`` heads.

    Members without a block map (``mask_kind`` other than ``"block"``: routing, vertical_slash) make
    :meth:`build` return a :class:`~sparse_attn.head_groups.HeadGroupsMask` (one launch for the block-map
    heads, one per other distinct pattern); such a per_head has no :meth:`block_map` and does not nest in a
    union. Routing members start cold at every build (no warm-start state per head group).

    Example:
        >>> pat = PerHead(patterns=(Dense(), SlidingWindow(left=64, right=64), BlockTopK(k=4), Skip()))
    """

    patterns: Tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "patterns", _as_patterns(self.patterns, "patterns"))
        _same_blocks(self.patterns, "per_head")

    @property
    def block_size(self):
        return self.patterns[0].block_size

    @property
    def mask_kind(self):
        return "block" if all(p.mask_kind == "block" for p in self.patterns) else "groups"

    def to_dict(self) -> dict:
        return {"name": self.name, "patterns": [p.to_dict() for p in self.patterns]}

    def _each_distinct(self, q, fn) -> dict:
        """``pattern json -> fn(pattern)``: each distinct member is built once, over all heads."""
        if len(self.patterns) != q.shape[1]:
            raise ValueError(f"per_head has {len(self.patterns)} patterns, but q has {q.shape[1]} heads.")
        out = {}
        for p in self.patterns:
            key = p.to_json()
            if key not in out:
                out[key] = fn(p)
        return out

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        maps = self._each_distinct(q, lambda p: p.block_map(q, k, causal=causal, layout=layout, forced=forced))
        batch, n_q_heads = max(m.shape[0] for m in maps.values()), q.shape[1]

        def head_of(m, h):  # a map's heads: 1, one per query head, or one per kv head (a GQA group's selection)
            return 0 if m.shape[1] == 1 else h * m.shape[1] // n_q_heads
        heads = [maps[p.to_json()][:, head_of(maps[p.to_json()], h)] for h, p in enumerate(self.patterns)]
        return torch.stack([x.expand(batch, *x.shape[1:]) for x in heads], dim=1)

    def build(self, q, k, *, causal=False, layout=None):
        """A :class:`BlockSparseMask` when every member has a block map, else a ``HeadGroupsMask``.

        Every member is built on ALL heads (as the search measured it: patterns may couple heads or
        carry per-head budgets) and its mask is then cut to the heads that chose it.
        """
        if self.mask_kind == "block":
            if any(p.token_exact for p in self.patterns):
                return self._build_exact(q, k, causal, layout)
            return super().build(q, k, causal=causal, layout=layout)
        check_qk(q, k)
        n_heads, n_kv = q.shape[1], k.shape[1]
        if len(self.patterns) != n_heads:
            raise ValueError(f"per_head has {len(self.patterns)} patterns, but q has {n_heads} heads.")
        seq_lens = (q.shape[2], k.shape[2])
        heads_of = {}  # one group for all block-map heads, one per other distinct pattern
        for h, p in enumerate(self.patterns):
            heads_of.setdefault("block" if p.mask_kind == "block" else p.to_json(), []).append(h)
        groups = []
        for key, heads in heads_of.items():
            idx = torch.tensor(heads)
            if key == "block":  # non-block heads are skipped in the shared block map
                filler = Skip(block_size=self.block_size)
                keep = PerHead(patterns=tuple(p if p.mask_kind == "block" else filler for p in self.patterns))
                keep = keep.block_map(q, k, causal=bool(causal), layout=layout)
                full = BlockSparseMask.from_dense(keep.index_select(1, idx.to(keep.device)), self.block_pair, seq_lens)
                groups.append((heads, full))
            else:
                full = self.patterns[heads[0]].build(q, k, causal=causal, layout=layout)
                groups.append((heads, select_heads(full, idx, n_heads, n_kv)))
        return HeadGroupsMask(sorted(groups, key=lambda g: g[0][0]), n_heads, seq_lens)

    def _build_exact(self, q, k, causal, layout):
        """Per-head mix with token-exact members: each head keeps its member's exact pairs."""
        check_qk(q, k)
        n_heads = q.shape[1]

        def build(p):
            m = p.build(q, k, causal=causal, layout=layout)
            if m.batch_heads[1] not in (1, n_heads):  # per kv head: one entry per query head
                g = n_heads // m.batch_heads[1]
                m = m.map_heads(lambda x: x.repeat_interleave(g, 1))
            return m
        masks = self._each_distinct(q, build)
        member = [masks[p.to_json()] for p in self.patterns]
        batch = max(max(m.batch_heads[0], m.predicate_batch) for m in member)

        def per_head(views):
            return torch.stack([v[:, min(h, v.shape[1] - 1)].expand(batch, *v.shape[2:])
                                for h, v in enumerate(views)], 1)
        tiles = per_head([m.to_block_dense() for m in member])
        full = per_head([m.full_tiles() for m in member])
        keys = [p.to_json() for p in self.patterns]
        head_key = torch.tensor([list(masks).index(key) for key in keys])

        def evaluate(b, h, qb, kb):
            out = torch.zeros((qb.numel(), *self.block_pair), dtype=torch.bool, device=qb.device)
            for i, m in enumerate(masks.values()):
                sel = head_key.to(h.device)[h] == i
                if bool(sel.any()):
                    out[sel] = m.tile_tokens(b[sel], h[sel], qb[sel], kb[sel])
            return out
        return BlockSparseMask.from_tile_evaluator(evaluate, tiles, self.block_pair, (q.shape[2], k.shape[2]),
                                                   full=full)
