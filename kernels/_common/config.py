"""Launch configurations shared by the kernel families.

Autotuning covers ``num_warps``/``num_stages`` only; tile sizes come from the mask
and the launcher, and sequence lengths are never part of an autotune key.
Under ``TRITON_INTERPRET=1`` a single configuration is used so that tests run
each kernel once.
"""

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fwd_configs():
    """Candidate launch configurations for the attention kernels."""
    if interpreting() or os.environ.get("SPARSE_ATTN_NO_AUTOTUNE", "0") == "1":
        return [triton.Config({}, num_warps=4, num_stages=2)]
    # num_stages=1 is the fallback for tiles that do not fit shared memory when pipelined
    # (fp32 with head dims padded to 256); the autotuner skips configurations that run out of resources.
    return [
        triton.Config({}, num_warps=w, num_stages=s)
        for w in (4, 8)
        for s in (1, 2, 3)
    ]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products (no TF32) so results match the fp32 oracle."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor)."""
    return max(floor, triton.next_power_of_2(int(n)))


def inner_tile(block: int, head_dim_pad: int, dtype: torch.dtype) -> int:
    """Rows of K/V (or Q) loaded per step inside one mask block.

    64 by default; 32 for fp32 with head dims padded to 256, whose 64-row tiles need more than the
    227 KiB of shared memory of an H100/H200 in the backward kernels (found by compiling for sm_90).
    """
    tile = 32 if (dtype == torch.float32 and head_dim_pad >= 256) else 64
    return min(block, tile)
