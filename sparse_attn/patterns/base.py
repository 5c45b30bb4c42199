"""The pattern protocol, the registry and the JSON round trip.

A pattern is a small frozen dataclass. ``build(q, k, *, causal=False, layout=None)``
returns a mask (:class:`~sparse_attn.BlockSparseMask`, or a ``StripeSparseMask`` for
vertical+slash). Every pattern produces a boolean block map ``[Bm, Hm, NQB, NKB]``
internally (``block_map``), which is what unions and per-head mixing combine before one
mask is built, so a mixed mask still runs as one kernel launch.

Structural patterns (content-free) also give their token predicate in FlexAttention's
``mask_mod(b, h, q_idx, kv_idx)`` form; their block map keeps exactly the tiles where
the predicate (and, with ``causal``, the bottom-right causal predicate) holds somewhere.
"""

import dataclasses
import json
import math
from typing import ClassVar, Optional, Tuple

import torch

from ..layout import TokenLayout
from ..mask import BlockSparseMask, _as_pair
from .registry import Registry

_REGISTRY = Registry("pattern")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def register(name: str):
    """Class decorator: make a pattern class available as ``get_pattern(name)``."""
    return _REGISTRY.register(name)


def list_patterns() -> list:
    """Registered pattern names, sorted."""
    return _REGISTRY.names()


def get_pattern(name: str, **kw) -> "Pattern":
    """A configured pattern by registry name, e.g. ``get_pattern("block_topk", k=8)``."""
    return _REGISTRY.get(name, **kw)


def pattern_from_dict(d) -> "Pattern":
    """Inverse of :meth:`Pattern.to_dict`."""
    name, kw = _REGISTRY.split_config(d)
    return get_pattern(name, **kw)


def pattern_from_json(text) -> "Pattern":
    """Inverse of :meth:`Pattern.to_json` (also accepts the decoded dict)."""
    return pattern_from_dict(json.loads(text) if isinstance(text, str) else text)


def _encode(value):
    if isinstance(value, Pattern):
        return value.to_dict()
    if isinstance(value, TokenLayout):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


def as_tuple(value):
    """Lists (from JSON) become tuples so configs compare and hash equal after a round trip."""
    if isinstance(value, list):
        return tuple(as_tuple(v) for v in value)
    return value


def as_pattern(value, name):
    if isinstance(value, dict):
        return pattern_from_dict(value)
    if not isinstance(value, Pattern):
        raise TypeError(f"{name} must be a Pattern or a pattern dict, got {type(value).__name__}.")
    return value


def as_layout(value):
    if value is None or isinstance(value, TokenLayout):
        return value
    if isinstance(value, dict):
        return TokenLayout.from_dict(value)
    raise TypeError(f"layout must be a TokenLayout, a dict or None, got {type(value).__name__}.")


def check_qk(q, k):
    """Shapes ``q [B, Hq, Lq, D]`` and ``k [B, Hkv, Lk, D]`` with ``Hq % Hkv == 0``."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, L, D] (rank 4), got {list(x.shape)}.")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}.")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have batch {q.shape[0]} and head dim {q.shape[3]} like q, got {list(k.shape)}.")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]}).")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}.")


def tile_bounds(q_len, kv_len, block_size, device=None):
    """First/last token of every query block ``[NQB, 1]`` and key block ``[1, NKB]`` (int64)."""
    bm, bn = block_size
    n_qb, n_kb = math.ceil(q_len / bm), math.ceil(kv_len / bn)
    q_first = torch.arange(n_qb, device=device)[:, None] * bm
    q_last = torch.clamp(q_first + bm, max=q_len) - 1
    k_first = torch.arange(n_kb, device=device)[None, :] * bn
    k_last = torch.clamp(k_first + bn, max=kv_len) - 1
    return q_first, q_last, k_first, k_last


def causal_tiles(q_len, kv_len, block_size, device=None) -> torch.Tensor:
    """bool ``[NQB, NKB]``: tiles with at least one pair visible under bottom-right causality."""
    q_first, q_last, k_first, k_last = tile_bounds(q_len, kv_len, block_size, device)
    return k_first <= q_last + (kv_len - q_len)


def _ramp_sum(first, n):
    """``sum_{t<n} max(0, first + t)`` elementwise (int64): the positive part of an integer ramp."""
    tri = lambda m: m.clamp_min(0) * (m.clamp_min(0) + 1) // 2  # noqa: E731  T(m) = 1 + ... + m
    return tri(first + n - 1) - tri(first - 1)


def visible_area(q_len, kv_len, block_size, causal, device=None, kv_start=0) -> torch.Tensor:
    """float32 ``[NQB, NKB]``: the pairs of each tile a query may attend (keys ``>= kv_start``; with ``causal``
    bottom-right causality), counted in closed form (no ``[NQB, NKB, bm]`` intermediate)."""
    q_first, q_last, k_first, k_last = tile_bounds(q_len, kv_len, block_size, device)
    lo = torch.clamp(k_first, min=kv_start)  # [1, NKB]
    width = (k_last - lo + 1).clamp_min(0)  # keys of the tile past kv_start
    rows = q_last - q_first + 1  # [NQB, 1]
    if not causal:
        return (rows * width).float()
    # row i sees clamp(i + shift - lo + 1, 0, width) keys: a ramp clipped at 0 and at width
    first = q_first + (kv_len - q_len) - lo + 1  # [NQB, NKB]
    return (_ramp_sum(first, rows) - _ramp_sum(first - width, rows)).float()


def causal_anchors(q_len, kv_len, block_size, device=None) -> torch.Tensor:
    """bool ``[NQB, NKB]``: under bottom-right causality, each query block's diagonal tiles (those holding a
    row's own key position ``i + Lk - Lq``) and its sink tile (the first key block), where visible. Content
    patterns keep them in every causal mask: a causal LM's rows depend on both, and scoring by tile mass or
    area can rank the half-visible diagonal tile low."""
    q_first, q_last, k_first, k_last = tile_bounds(q_len, kv_len, block_size, device)
    shift = kv_len - q_len
    visible = k_first <= q_last + shift
    diagonal = visible & (k_last >= q_first + shift)
    return diagonal | (visible & (k_first == 0))


def block_map_from_predicate(pred, q_len, kv_len, block_size, device=None, causal=False, max_elems=1 << 24):
    """bool ``[NQB, NKB]``: tiles where the token predicate ``pred(q_idx [R,1], kv_idx [1,Lk])`` holds somewhere.

    Evaluated in chunks of query blocks (at most ``max_elems`` token pairs at a time).
    """
    bm, bn = block_size
    n_qb, n_kb = math.ceil(q_len / bm), math.ceil(kv_len / bn)
    out = torch.zeros((n_qb, n_kb), dtype=torch.bool, device=device)
    kv_idx = torch.arange(n_kb * bn, device=device)[None, :]
    step = max(1, max_elems // max(1, bm * n_kb * bn))
    shift = kv_len - q_len
    for r0 in range(0, n_qb, step):
        r1 = min(n_qb, r0 + step)
        q_idx = torch.arange(r0 * bm, r1 * bm, device=device)[:, None]
        keep = pred(q_idx, kv_idx) & (q_idx < q_len) & (kv_idx < kv_len)
        if causal:
            keep = keep & (kv_idx <= q_idx + shift)
        out[r0:r1] = keep.reshape(r1 - r0, bm, n_kb, bn).any(3).any(1)
    return out


def drop_padding(keep, q, k, block_size):
    """``keep [B|1, H, NQB, NKB]`` without the tiles that hold no valid query or key under
    :func:`sparse_attn.patterns.padding` (unchanged outside it)."""
    from . import _scoring as S
    valid = S.valid_tiles(q.shape[2], k.shape[2], *block_size, keep.device)
    return keep if valid is None else keep & valid


class Pattern:
    """Base of every pattern: subclasses are frozen dataclasses with a ``block_size`` field."""

    name: ClassVar[str] = "pattern"
    structural: ClassVar[bool] = False
    # what build() returns: "block" (a BlockSparseMask from block_map: combinable in union/per_head into
    # one launch), "stripe", "permuted" or "routed" (per_head runs those as separate head groups)
    mask_kind: ClassVar[str] = "block"
    # True when build() returns a token-exact mask (window predicate or bit-masked tiles), not whole tiles
    token_exact: ClassVar[bool] = False

    # ---- the protocol -------------------------------------------------------------------
    def build(self, q, k, *, causal: bool = False, layout: Optional[TokenLayout] = None):
        """The mask for attention of ``q [B, Hq, Lq, D]`` over ``k [B, Hkv, Lk, D]``.

        Returns:
            :class:`~sparse_attn.BlockSparseMask` with ``block_size`` of the pattern, batch 1 or B and
            heads 1 or Hq.
        """
        check_qk(q, k)
        keep = self.block_map(q, k, causal=bool(causal), layout=layout)
        return BlockSparseMask.from_dense(drop_padding(keep, q, k, self.block_pair), self.block_pair,
                                          (q.shape[2], k.shape[2]))

    def block_map(self, q, k, *, causal=False, layout=None, forced=None) -> torch.Tensor:
        """bool ``[Bm, Hm, NQB, NKB]``. ``forced`` (broadcastable bool) are tiles kept anyway;
        content-based patterns spend their budget on the other tiles."""
        raise NotImplementedError(f"{type(self).__name__} must implement block_map")

    # ---- configuration ------------------------------------------------------------------
    @property
    def block_pair(self) -> Tuple[int, int]:
        return _as_pair(self.block_size)

    def to_dict(self) -> dict:
        out = {"name": self.name}
        for f in dataclasses.fields(self):
            out[f.name] = _encode(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        """JSON of the configuration; :func:`pattern_from_json` rebuilds an equal pattern."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def __or__(self, other):
        """``a | b``: the registered ``"union"`` pattern of both (:class:`~sparse_attn.patterns.Union`).

        Looked up by name so that this module does not import ``combine`` (which builds on it); importing
        :mod:`sparse_attn` or any of its pattern modules registers it.
        """
        return _REGISTRY.get("union", patterns=(self, other))


class StructuralPattern(Pattern):
    """A pattern that depends on positions only (never on q/k values)."""

    structural: ClassVar[bool] = True

    def mask_mod_for(self, q_len=None, kv_len=None, layout=None):
        """Token predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for these lengths.

        ``q_len``/``kv_len`` only set the diagonal alignment (bottom-right, ``shift = Lk - Lq``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement mask_mod_for")

    @property
    def mask_mod(self):
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (a plain function) for equal query/key
        lengths, using the pattern's own ``layout`` field; pass it to ``create_block_mask``."""
        return self.mask_mod_for(None, None, getattr(self, "layout", None))

    def structure_map(self, q_len, kv_len, *, causal=False, layout=None, device=None) -> torch.Tensor:
        """bool ``[NQB, NKB]``: tiles where ``predicate & causal`` holds somewhere (default: evaluate it)."""
        mod = self.mask_mod_for(q_len, kv_len, layout)
        return block_map_from_predicate(lambda i, j: mod(0, 0, i, j), q_len, kv_len, self.block_pair, device,
                                        causal=causal)

    def block_map_for(self, q_len, kv_len, *, causal=False, layout=None, device=None) -> torch.Tensor:
        """bool ``[1, 1, NQB, NKB]`` from lengths alone."""
        layout = self._layout(layout, q_len, kv_len)
        return self.structure_map(q_len, kv_len, causal=causal, layout=layout, device=device)[None, None]

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        keep = self.block_map_for(q.shape[2], k.shape[2], causal=causal, layout=layout, device=q.device)
        return keep if forced is None else keep | forced

    def build_for(self, q_len, kv_len, *, causal=False, layout=None, device=None) -> BlockSparseMask:
        """The mask from lengths alone (structural patterns need no tensors)."""
        keep = self.block_map_for(q_len, kv_len, causal=causal, layout=layout, device=device)
        return BlockSparseMask.from_dense(keep, self.block_pair, (q_len, kv_len))

    def _layout(self, layout, q_len, kv_len):
        """The layout to use (argument first, then the pattern's own field); None for 1-D patterns."""
        return layout
