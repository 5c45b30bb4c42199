"""CPU path: time of the issue-2 CPU bar row for several gather chunk sizes (median of 5 calls).

    python benchmarks/cpu_chunk_size.py [MiB ...]

The row: L = 8192, 8 heads, D = 64, 64x64 blocks, 10% random block density, fp32, B = 1.
Prints one line per chunk size with the ratio to dense SDPA measured in the same run.
"""

import sys
import time

import torch

from sparse_attn import BlockSparseMask
from sparse_attn_kernels.block_sparse.cpu import block_sparse_fwd_cpu


def median_time(fn, n=5):
    fn()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2]


def main(sizes_mib):
    torch.manual_seed(0)
    length, heads, dim = 8192, 8, 64
    q, k, v = (torch.randn(1, heads, length, dim) for _ in range(3))
    keep = torch.rand(1, heads, length // 64, length // 64) < 0.1
    mask = BlockSparseMask.from_dense(keep, 64, seq_lens=(length, length))
    dense = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    for mib in sizes_mib:
        t = median_time(lambda: block_sparse_fwd_cpu(q, k, v, mask.counts, mask.indices, 64, 64, False,
                                                     dim ** -0.5, chunk_bytes=mib << 20))
        print(f"{mib:4d} MiB  {t * 1e3:7.1f} ms  dense/ours {dense / t:.2f}")
    print(f"dense SDPA {dense * 1e3:.1f} ms")


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [2, 4, 8, 12, 16, 24, 64, 256])
