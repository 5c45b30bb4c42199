"""k-means assignment (Triton): nearest centroid per token, one program per (group, tile of tokens).

The program keeps a tile of ``TL`` points in registers and sweeps the centroids in tiles of ``TC``,
carrying the running best score and its index (first index wins ties, as ``torch.argmax``).
Twin: :func:`sparse_attn_kernels.reference_scoring.kmeans_assign_ref`.
"""

import torch
import triton
import triton.language as tl

from .._common.config import launch_config, pow2_at_least


@triton.jit(do_not_specialize=["length", "n_clusters"])
def _kmeans_assign_kernel(
    x_ptr, c_ptr, out_ptr, length, n_clusters,
    IS_L2: tl.constexpr, TL: tl.constexpr, TC: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    offs_l = pid_l * TL + tl.arange(0, TL)  # [TL]
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    x = tl.load(x_ptr + (g * length + offs_l[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=(offs_l[:, None] < length) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [TL, D]
    best = tl.full([TL], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([TL], dtype=tl.int32)
    for c0 in range(0, n_clusters, TC):
        offs_c = c0 + tl.arange(0, TC)  # [TC]
        c = tl.load(c_ptr + (g * n_clusters + offs_c[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=(offs_c[:, None] < n_clusters) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [TC, D]
        # -- scores x.c (l2: minus |c|^2 / 2) ----
        s = tl.dot(x, tl.trans(c), input_precision="ieee")  # [TL, TC]
        if IS_L2:
            s = s - 0.5 * tl.sum(c * c, 1)[None, :]
        s = tl.where(offs_c[None, :] < n_clusters, s, float("-inf"))
        tile_best = tl.max(s, 1)
        tile_i = tl.argmax(s, 1).to(tl.int32) + c0
        better = tile_best > best  # strict: the earlier index keeps ties
        best_i = tl.where(better, tile_i, best_i)
        best = tl.where(better, tile_best, best)
    tl.store(out_ptr + g * length + offs_l, best_i.to(tl.int64), mask=offs_l < length)


def kmeans_assign(x, centroids, metric):
    """Triton twin of :func:`kmeans_assign_ref`: ``x [G, L, D]``, ``centroids [G, C, D]`` -> int64 ``[G, L]``."""
    g, length, dim = x.shape
    x, centroids = x.float().contiguous(), centroids.float().contiguous()
    out = torch.empty((g, length), dtype=torch.int64, device=x.device)
    if out.numel() == 0:
        return out
    grid = (g, triton.cdiv(length, 64))
    pad = pow2_at_least(dim, 16)
    warps, stages = launch_config("kmeans", torch.float32, 64, 32, pad)
    _kmeans_assign_kernel[grid](x, centroids, out, length, centroids.shape[1], IS_L2=metric == "l2",
                                TL=64, TC=32, HEAD_DIM=dim, HEAD_DIM_PAD=pad, num_warps=warps, num_stages=stages)
    return out
