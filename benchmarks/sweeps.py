"""Named benchmark sweeps (definitions live in ``sparse_attn.bench.sweeps`` so the installed CLI has them).

Add a sweep there with :func:`grid`, then run it by name::

    sparse-attn bench --sweep cpu --out bench_out

``python benchmarks/sweeps.py`` lists every sweep and its cases.
"""

from sparse_attn.bench.sweeps import CPU_BAR, SWEEPS, Case, get_sweep, grid, with_fields

__all__ = ["CPU_BAR", "SWEEPS", "Case", "get_sweep", "grid", "with_fields"]

if __name__ == "__main__":
    for name, cases in SWEEPS.items():
        print(f"{name} ({len(cases)} cases)")
        for case in cases:
            print("   ", case.label())
