"""Benchmark cases and the named sweeps that ``sparse-attn bench`` runs.

A :class:`Case` is one attention problem (shapes, dtype, mask family, density,
forward or forward+backward). A sweep is a named list of cases; :func:`grid`
builds the cross product of its axes. ``benchmarks/sweeps.py`` in the source tree
re-exports these definitions (it is where new sweeps are proposed); they live in
the package so that an installed ``sparse-attn bench --quick`` works without a
source checkout.
"""

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence

K = 1024


@dataclass(frozen=True)
class Case:
    """One benchmark problem: q ``[batch, heads, seq_len, head_dim]``, k/v with ``kv_heads``.

    ``kind="block"`` uses a random block mask with ``round(density * NKB)`` key blocks per
    query block (per head); ``kind="stripe"`` uses ``verticals`` key columns and ``slashes``
    diagonals per head (density then follows from them); ``kind="document"`` packs ``docs``
    documents of random lengths (token-exact segment mask, causal when ``causal``);
    ``kind="window"`` is a sliding window of ``window`` keys to the left (token-exact).
    ``mode`` is ``"fwd"`` or ``"fwdbwd"``.
    """

    seq_len: int
    head_dim: int = 64
    heads: int = 8
    kv_heads: Optional[int] = None
    batch: int = 1
    dtype: str = "float32"
    density: float = 0.1
    block: int = 64
    causal: bool = False
    mode: str = "fwd"
    kind: str = "block"
    verticals: int = 0
    slashes: int = 0
    docs: int = 0
    window: int = 0

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    def check(self) -> "Case":
        """``ValueError`` naming the field when a value is outside what the benchmark runs."""
        allowed = {"dtype": ("float16", "bfloat16", "float32"), "mode": ("fwd", "fwdbwd"),
                   "kind": ("block", "stripe", "document", "window")}
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be one of {values}, got {getattr(self, name)!r}.")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}.")
        for name in ("seq_len", "head_dim", "heads", "batch", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.heads % self.n_kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.n_kv_heads}).")
        return self

    def label(self) -> str:
        """Short human-readable description used in progress bars and error messages."""
        tail = {"block": f"dens={self.density:.0%}", "stripe": f"v={self.verticals},s={self.slashes}",
                "document": f"docs={self.docs}", "window": f"window={self.window}"}[self.kind]
        return (f"{self.kind} L={self.seq_len} H={self.heads} D={self.head_dim} {self.dtype} "
                f"{tail}{' causal' if self.causal else ''} {self.mode}")

    def as_dict(self) -> dict:
        return asdict(self)


def grid(**axes) -> List[Case]:
    """Cross product of ``Case`` fields: each keyword is a field name and a list of values."""
    names = list(axes)
    values = [v if isinstance(v, (list, tuple)) else [v] for v in axes.values()]
    return [Case(**dict(zip(names, combo))) for combo in itertools.product(*values)]


def with_fields(cases: Sequence[Case], **fields) -> List[Case]:
    """The same cases with some fields replaced (``None`` values are ignored)."""
    fields = {k: v for k, v in fields.items() if v is not None}
    return [replace(c, **fields) for c in cases]


# The CPU speed bar: L = 8192, 8 heads, D = 64, 64x64 blocks, 10% density.
CPU_BAR = Case(seq_len=8 * K, heads=8, head_dim=64, block=64, density=0.1, dtype="float32")
# Token-exact rows: packed documents and a sliding window (partial tiles with in-kernel predicates).
TOKEN_EXACT_CPU = [Case(seq_len=4 * K, heads=8, head_dim=64, kind="document", docs=8, causal=True),
                   Case(seq_len=4 * K, heads=8, head_dim=64, kind="window", window=500, causal=True)]

SWEEPS: Dict[str, List[Case]] = {
    # A few seconds on a laptop CPU; used by the tests.
    "tiny": grid(seq_len=[256, 512], heads=2, head_dim=32, density=[0.25, 1.0]),
    # ``sparse-attn bench --quick`` on a CPU-only machine (< 2 minutes on 2 cores).
    "quick-cpu": grid(seq_len=2 * K, heads=8, head_dim=64, density=[0.1, 0.3, 1.0]) + [CPU_BAR] + TOKEN_EXACT_CPU,
    # token-exact masks on CPU (document packing, sliding window) at two lengths
    "cpu-token-exact": grid(seq_len=[4 * K, 8 * K], heads=8, head_dim=64, kind="document", docs=8, causal=True)
    + grid(seq_len=[4 * K, 8 * K], heads=8, head_dim=64, kind="window", window=500, causal=True),
    # ``sparse-attn bench --quick`` on a GPU (about a minute, most of it compiling FlexAttention).
    "quick-gpu": grid(seq_len=[4 * K, 16 * K], heads=16, head_dim=128, dtype="bfloat16",
                      density=[0.1, 0.3, 1.0]),
    # A longer CPU sweep: speed vs length and speedup vs density.
    "cpu": grid(seq_len=[1 * K, 2 * K, 4 * K, 8 * K], heads=8, head_dim=64, density=[0.05, 0.1, 0.3, 1.0]),
    # forward+backward on CPU (FlexAttention has no CPU backward: its rows say so).
    "cpu-fwdbwd": grid(seq_len=[2 * K, 4 * K], heads=8, head_dim=64, density=[0.1, 0.3], mode="fwdbwd"),
    # stripe kernel on CPU: MInference's budgets (1000 verticals + 4096 slashes at 128k) scaled to 8k.
    "cpu-stripe": grid(seq_len=8 * K, heads=8, head_dim=64, kind="stripe", verticals=64, slashes=256, causal=True),
    # issue 2 item 8: the short GPU benchmark of benchmarks/gpu_check.py.
    "gpu-check": grid(seq_len=[4 * K, 16 * K, 64 * K], heads=16, head_dim=[64, 128], dtype="bfloat16",
                      density=[0.1, 0.3, 1.0]),
    # forward+backward rows of gpu_check (issue 3), run when the backward pass exists.
    "gpu-check-bwd": grid(seq_len=[16 * K, 64 * K], heads=16, head_dim=128, dtype="bfloat16",
                          density=[0.1, 0.3], mode="fwdbwd"),
    # stripe rows of gpu_check (issue 4): 1000 verticals + 4096 slashes, causal.
    "gpu-check-stripe": grid(seq_len=[64 * K, 128 * K], heads=16, head_dim=128, dtype="bfloat16",
                             kind="stripe", verticals=1000, slashes=4096, causal=True),
    # token-exact rows of gpu_check: packed documents and a sliding window, vs Flex on the same mask_mod
    "gpu-check-token-exact": grid(seq_len=[16 * K, 64 * K], heads=16, head_dim=128, dtype="bfloat16",
                                  kind="document", docs=16, causal=True)
    + grid(seq_len=[16 * K, 64 * K], heads=16, head_dim=128, dtype="bfloat16", kind="window", window=4096,
           causal=True),
    # The full GPU sweep for docs/benchmarks.md.
    "gpu": grid(seq_len=[2 * K, 4 * K, 8 * K, 16 * K, 32 * K, 64 * K], heads=16, head_dim=[64, 128],
                dtype=["bfloat16", "float16"], density=[0.05, 0.1, 0.2, 0.3, 0.5, 1.0], mode=["fwd", "fwdbwd"]),
}


def get_sweep(name: str) -> List[Case]:
    """The cases of a named sweep; ``ValueError`` listing the names if unknown."""
    if name not in SWEEPS:
        raise ValueError(f"sweep must be one of {sorted(SWEEPS)}, got {name!r}.")
    return list(SWEEPS[name])
