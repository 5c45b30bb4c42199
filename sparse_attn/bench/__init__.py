"""Benchmark machinery behind ``sparse-attn bench`` (sweeps, checks, timing, reports).

Example:
    >>> from sparse_attn.bench import get_sweep
    >>> [c.seq_len for c in get_sweep("tiny")]
    [256, 256, 512, 512]
"""

from .runner import run_case, run_sweep
from .sweeps import CPU_BAR, SWEEPS, Case, get_sweep, grid

__all__ = ["CPU_BAR", "SWEEPS", "Case", "get_sweep", "grid", "run_case", "run_sweep"]
