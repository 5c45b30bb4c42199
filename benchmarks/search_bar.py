"""Issue-6 search bar: per-head plan vs the best single pattern at (at least) equal density.

    python benchmarks/search_bar.py [L ...]      (default 4096)

See sparse_attn/bench/search_bar.py for the setup. Prints one block per length.
"""

import sys
import time

import torch

from sparse_attn.bench.machine import machine_header
from sparse_attn.bench.search_bar import search_vs_single


def main(lengths):
    print(machine_header(torch.device("cpu")))
    for n in lengths:
        t0 = time.perf_counter()
        res = search_vs_single(n)
        names, err, dens = res["plan"]
        print(f"L={n}: plan {names}: error {err:.4f} at density {dens:.3f}")
        for name, (s_err, s_dens) in res["single"].items():
            print(f"  {name:<15} {res['single_patterns'][name]!r}: error {s_err:.4f} at density {s_dens:.3f}")
        print(f"  [{time.perf_counter() - t0:.1f} s]", flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [4096])
