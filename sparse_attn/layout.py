"""Token layouts: where text tokens and video frames sit in a 1-D token sequence.

A :class:`TokenLayout` tells video patterns where frames start. Text-only sequences
need no layout; video DiTs put text before the video (CogVideoX), after it
(HunyuanVideo) or nowhere (Wan). Video tokens are frame-major: token ``v`` of the
video part is frame ``v // (H*W)``, row ``(v % (H*W)) // W``, column ``v % W``.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import check_positive_int

_TEXT_POSITIONS = ("before", "after")


@dataclass(frozen=True)
class TokenLayout:
    """A token sequence of ``text_len`` text tokens and a ``frames x height x width`` video grid.

    Attributes:
        frames, height, width: video grid (0 frames: a text-only sequence of ``text_len`` tokens).
        text_len: number of text tokens.
        text_position: ``"before"`` (text first, CogVideoX) or ``"after"`` (HunyuanVideo).

    Example:
        >>> lay = TokenLayout.video(frames=4, height=8, width=8, text_len=16)
        >>> lay.seq_len, lay.tokens_per_frame, lay.video_start
        (272, 64, 16)
    """

    frames: int = 0
    height: int = 0
    width: int = 0
    text_len: int = 0
    text_position: str = "before"

    def __post_init__(self):
        for name in ("frames", "height", "width", "text_len"):
            check_positive_int(getattr(self, name), name, allow_zero=True)
        if self.text_position not in _TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {_TEXT_POSITIONS}, got {self.text_position!r}.")
        if self.frames and not (self.height and self.width):
            raise ValueError(f"a video layout needs height and width >= 1, got {self.height} x {self.width}.")

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def text(cls, seq_len: int) -> "TokenLayout":
        """A 1-D text sequence of ``seq_len`` tokens."""
        return cls(text_len=check_positive_int(seq_len, "seq_len", allow_zero=True))

    @classmethod
    def video(cls, frames, height, width, text_len=0, text_position="before") -> "TokenLayout":
        """A video grid with optional text tokens before or after it."""
        check_positive_int(frames, "frames")
        return cls(frames, height, width, text_len, text_position)

    @classmethod
    def from_dict(cls, d) -> "TokenLayout":
        if not isinstance(d, dict):
            raise TypeError(f"layout must be a dict, got {type(d).__name__}.")
        return cls(**d)

    def to_dict(self) -> dict:
        return {"frames": self.frames, "height": self.height, "width": self.width,
                "text_len": self.text_len, "text_position": self.text_position}

    # ---- geometry -----------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return self.frames > 0

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_len(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def seq_len(self) -> int:
        return self.video_len + self.text_len

    @property
    def video_start(self) -> int:
        """Index of the first video token."""
        return self.text_len if self.text_position == "before" else 0

    @property
    def text_start(self) -> int:
        return 0 if self.text_position == "before" else self.video_len

    def check_len(self, seq_len: int, name: str = "sequence length") -> "TokenLayout":
        if seq_len != self.seq_len:
            raise ValueError(f"{name} must equal the layout's {self.seq_len} tokens "
                             f"({self.text_len} text + {self.frames}x{self.height}x{self.width} video), got {seq_len}.")
        return self

    def is_text(self, idx):
        """bool tensor: which token indices are text tokens (works on tensors of any shape)."""
        return (idx >= self.text_start) & (idx < self.text_start + self.text_len)

    def coords(self, idx):
        """``(t, y, x)`` of video token indices (meaningless on text tokens; clamp first)."""
        v = idx - self.video_start
        tpf = max(1, self.tokens_per_frame)
        w = max(1, self.width)
        return v // tpf, (v % tpf) // w, v % w

    def text_blocks(self, block: int, n_blocks: int, device=None) -> torch.Tensor:
        """bool ``[n_blocks]``: blocks of size ``block`` that contain at least one text token."""
        first = torch.arange(n_blocks, device=device) * block
        last = torch.clamp(first + block, max=self.seq_len) - 1
        return (last >= self.text_start) & (first < self.text_start + self.text_len) & (self.text_len > 0)


def resolve_layout(layout: Optional[TokenLayout], seq_len: int) -> TokenLayout:
    """``layout`` checked against ``seq_len``; None means a text sequence."""
    if layout is None:
        return TokenLayout.text(seq_len)
    if isinstance(layout, dict):
        layout = TokenLayout.from_dict(layout)
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, a dict or None, got {type(layout).__name__}.")
    return layout.check_len(seq_len)
