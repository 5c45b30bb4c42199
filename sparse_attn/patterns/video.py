"""Structural video patterns over a :class:`~sparse_attn.TokenLayout` grid.

Both work on self-attention over ``text + frames x height x width`` tokens (Lq == Lk ==
layout.seq_len). With ``keep_text`` every text query sees all keys and every query sees
all text keys (text <-> video is always kept, as in AdaSpa and Sparse-vDiT).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .._checks import check_positive_int
from .base import StructuralPattern, as_layout, as_tuple, register, tile_bounds


class _VideoPattern(StructuralPattern):
    def _layout(self, layout, q_len, kv_len):
        layout = as_layout(layout) or self.layout
        if layout is None or not layout.is_video:
            raise ValueError(f"{self.name} needs a video layout (TokenLayout.video(...)) as build(layout=...) "
                             f"or as the pattern's layout field, got {layout!r}.")
        if q_len is not None:
            layout.check_len(q_len, "q length")
            layout.check_len(kv_len, "kv length")
        return layout

    def mask_mod_for(self, q_len=None, kv_len=None, layout=None):
        layout = self._layout(layout, q_len, kv_len)
        video_pair = self._video_pred(layout)
        keep_text = self.keep_text

        def mask_mod(b, h, q_idx, kv_idx):
            q_text, k_text = layout.is_text(q_idx), layout.is_text(kv_idx)
            keep = video_pair(q_idx, kv_idx) & ~q_text & ~k_text
            if keep_text:
                keep = keep | q_text | k_text
            return keep
        return mask_mod

    def _video_pred(self, layout):
        raise NotImplementedError

    def _runs(self, layout, i):
        """Key runs ``(start, end)`` ``[Lq, R]`` (inclusive token indices) that video query ``i`` keeps."""
        raise NotImplementedError

    def structure_map(self, q_len, kv_len, *, causal=False, layout=None, device=None):
        """Exact tile map from key runs per query (no ``Lq x Lk`` evaluation): ``O(Lq * (R + NKB))``."""
        bm, bn = self.block_pair
        q_first, q_last, k_first, k_last = tile_bounds(q_len, kv_len, self.block_pair, device)
        n_qb, n_kb = q_first.shape[0], k_first.shape[1]
        shift = kv_len - q_len
        i = torch.arange(q_len, device=device)
        start, end = self._runs(layout, i)
        start = start.clamp(min=layout.video_start)
        end = end.clamp(max=layout.video_start + layout.video_len - 1)
        if causal:
            end = torch.minimum(end, (i + shift)[:, None])
        ok = (start <= end) & ~layout.is_text(i)[:, None]  # [Lq, R]
        ones = ok.to(torch.int32)
        diff = torch.zeros((q_len, n_kb + 1), dtype=torch.int32, device=device)
        diff.scatter_add_(1, torch.where(ok, start // bn, n_kb), ones)
        diff.scatter_add_(1, torch.where(ok, end // bn + 1, n_kb), -ones)
        tok = torch.cumsum(diff[:, :n_kb], dim=1) > 0  # [Lq, NKB]
        tok = torch.nn.functional.pad(tok, (0, 0, 0, n_qb * bm - q_len))
        keep = tok.reshape(n_qb, bm, n_kb).any(1)
        if self.keep_text and layout.text_len:
            big = q_len + kv_len + 1
            q_text = torch.where(layout.is_text(i), i, -big)
            q_text = torch.nn.functional.pad(q_text, (0, n_qb * bm - q_len), value=-big).reshape(n_qb, bm).amax(1)
            j = torch.arange(kv_len, device=device)
            k_text = torch.where(layout.is_text(j), j, big)
            k_text = torch.nn.functional.pad(k_text, (0, n_kb * bn - kv_len), value=big).reshape(n_kb, bn).amin(1)
            lim = shift if causal else big
            keep = keep | ((q_text[:, None] >= 0) & (k_first <= q_text[:, None] + lim))  # text query rows
            keep = keep | ((k_text[None, :] < big) & (k_text[None, :] <= q_last + lim))  # text key columns
        return keep


@register("multi_diagonal")
@dataclass(frozen=True)
class MultiDiagonal(_VideoPattern):
    """Diagonals spaced by tokens-per-frame (Sparse-vDiT M3): query token at video position ``v`` keeps key
    ``v + m*P + e`` for ``|m| <= frames`` and ``|e| <= width`` (``P = height*width`` tokens per frame), i.e.
    the same spatial neighbourhood in neighbouring frames.

    Args:
        frames: how many neighbouring frames on each side (None: all).
        width: half-width of each diagonal band, in tokens.
        keep_text: keep text rows and columns.
        layout: default layout when ``build`` gets none.

    Example:
        >>> lay = TokenLayout.video(8, 16, 16, text_len=64)
        >>> mask = MultiDiagonal(frames=2, width=32).build_for(lay.seq_len, lay.seq_len, layout=lay)
    """

    frames: Optional[int] = None
    width: int = 32
    keep_text: bool = True
    layout: Optional[object] = None
    block_size: int = 64

    def __post_init__(self):
        if self.frames is not None:
            check_positive_int(self.frames, "frames", allow_zero=True)
        check_positive_int(self.width, "width", allow_zero=True)
        object.__setattr__(self, "layout", as_layout(self.layout))
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018

    def _video_pred(self, layout):
        period, width, vs = layout.tokens_per_frame, self.width, layout.video_start
        frames = layout.frames - 1 if self.frames is None else self.frames

        def pred(q_idx, kv_idx):
            d = (kv_idx - vs) - (q_idx - vs)
            m = (d + period // 2).div(period, rounding_mode="floor").clamp(-frames, frames)
            return (d - m * period).abs() <= width
        return pred

    def _runs(self, layout, i):
        frames = layout.frames - 1 if self.frames is None else self.frames
        centre = i[:, None] + torch.arange(-frames, frames + 1, device=i.device)[None, :] * layout.tokens_per_frame
        return centre - self.width, centre + self.width


@register("window_3d")
@dataclass(frozen=True)
class Window3D(_VideoPattern):
    """3-D local window over the video grid: ``|dt| <= window[0]``, ``|dy| <= window[1]``, ``|dx| <= window[2]``.

    Example:
        >>> lay = TokenLayout.video(8, 16, 16)
        >>> mask = Window3D(window=(1, 4, 4)).build_for(lay.seq_len, lay.seq_len, layout=lay)
    """

    window: Tuple[int, int, int] = (1, 4, 4)
    keep_text: bool = True
    layout: Optional[object] = None
    block_size: int = 64

    def __post_init__(self):
        win = as_tuple(self.window)
        if not (isinstance(win, tuple) and len(win) == 3):
            raise ValueError(f"window must be (frames, rows, cols) half-extents, got {self.window!r}.")
        for i, w in enumerate(win):
            check_positive_int(w, f"window[{i}]", allow_zero=True)
        object.__setattr__(self, "window", win)
        object.__setattr__(self, "layout", as_layout(self.layout))
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018

    def _video_pred(self, layout):
        wt, wy, wx = self.window

        def pred(q_idx, kv_idx):
            ti, yi, xi = layout.coords(q_idx)
            tj, yj, xj = layout.coords(kv_idx)
            return ((ti - tj).abs() <= wt) & ((yi - yj).abs() <= wy) & ((xi - xj).abs() <= wx)
        return pred

    def _runs(self, layout, i):
        wt, wy, wx = self.window
        t, y, x = layout.coords(i)
        dt, dy = torch.meshgrid(torch.arange(-wt, wt + 1, device=i.device), torch.arange(-wy, wy + 1, device=i.device),
                                indexing="ij")
        tt = t[:, None] + dt.reshape(1, -1)  # [Lq, R]
        yy = y[:, None] + dy.reshape(1, -1)
        row = layout.video_start + tt * layout.tokens_per_frame + yy * layout.width
        start = row + torch.clamp(x - wx, min=0)[:, None]
        end = row + torch.clamp(x + wx, max=layout.width - 1)[:, None]
        valid = (tt >= 0) & (tt < layout.frames) & (yy >= 0) & (yy < layout.height)
        return torch.where(valid, start, 1), torch.where(valid, end, 0)  # invalid runs are empty
