"""Block mean pooling and pooled block scores (Triton).

``block_mean_pool``: one program per (batch*head, block) averages the block's valid tokens.
``pooled_block_scores``: one program per (batch*query head, tile of pooled query blocks) takes
the dot products with every pooled key block; tiles that causality hides get -inf.
"""

import torch
import triton
import triton.language as tl

from .._common.attn_jit import split_program
from .._common.config import launch_config, pow2_at_least


@triton.jit(do_not_specialize=["length", "n_blocks", "block"])
def _block_mean_pool_kernel(
    x_ptr, out_ptr, stride_xb, stride_xh, stride_xl, n_heads, length, n_blocks, block,
    BLOCK_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    blk, _, b, h = split_program(pid, n_blocks, n_heads)
    end = tl.minimum(blk * block + block, length)
    offs_l = blk * block + tl.arange(0, BLOCK_PAD)  # [BLOCK_PAD]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    ptrs = x_ptr + b * stride_xb + h * stride_xh + offs_l[:, None].to(tl.int64) * stride_xl + offs_d[None, :]
    x = tl.load(ptrs, mask=(offs_l[:, None] < end) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    n_valid = (end - blk * block).to(tl.float32)
    mean = tl.sum(x.to(tl.float32), 0) / n_valid  # [D]
    out = out_ptr + pid.to(tl.int64) * HEAD_DIM + offs_d
    tl.store(out, mean, mask=offs_d < HEAD_DIM)


def block_mean_pool(x, block):
    """Triton twin of :func:`block_mean_pool_ref`: ``[B, H, L, D]`` -> float32 ``[B, H, ceil(L/block), D]``."""
    batch, heads, length, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_blocks = triton.cdiv(length, block)
    out = torch.empty((batch, heads, n_blocks, dim), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    pad = pow2_at_least(dim, 16)
    warps, stages = launch_config("pool", x.dtype, block, block, pad)
    _block_mean_pool_kernel[(batch * heads * n_blocks,)](
        x, out, x.stride(0), x.stride(1), x.stride(2), heads, length, n_blocks, block,
        BLOCK_PAD=pow2_at_least(block, 16), HEAD_DIM=dim, HEAD_DIM_PAD=pad, num_warps=warps, num_stages=stages)
    return out


@triton.jit(do_not_specialize=["n_qb", "n_kb", "q_len", "kv_len"])
def _pooled_scores_kernel(
    qp_ptr, kp_ptr, out_ptr, n_q_heads, n_qb, n_kb, q_len, kv_len, scale,
    GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TM: tl.constexpr, TN: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // n_q_heads
    h_kv = (bh % n_q_heads) // GROUP
    offs_m = pid_m * TM + tl.arange(0, TM)  # [TM] pooled query blocks
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    qp = tl.load(qp_ptr + (bh * n_qb + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
                 mask=(offs_m[:, None] < n_qb) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [TM, D]
    q_last = tl.minimum((offs_m + 1) * BLOCK_M, q_len) - 1  # [TM]
    kp_base = kp_ptr + (b * (n_q_heads // GROUP) + h_kv) * n_kb * HEAD_DIM
    for n0 in range(0, n_kb, TN):
        offs_n = n0 + tl.arange(0, TN)  # [TN]
        kp = tl.load(kp_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=(offs_n[:, None] < n_kb) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [TN, D]
        s = tl.dot(qp, tl.trans(kp), input_precision="ieee") * scale  # [TM, TN]
        if IS_CAUSAL:
            s = tl.where(offs_n[None, :] * BLOCK_N <= q_last[:, None] + (kv_len - q_len), s, float("-inf"))
        out = out_ptr + (bh * n_qb + offs_m[:, None]) * n_kb + offs_n[None, :]
        tl.store(out, s, mask=(offs_m[:, None] < n_qb) & (offs_n[None, :] < n_kb))


def pooled_block_scores(q_pool, k_pool, scale, q_len, kv_len, block_m, block_n, causal):
    """Triton twin of :func:`pooled_block_scores_ref` -> float32 ``[B, Hq, NQB, NKB]``."""
    batch, n_q_heads, n_qb, dim = q_pool.shape
    n_kv_heads, n_kb = k_pool.shape[1], k_pool.shape[2]
    q_pool, k_pool = q_pool.float().contiguous(), k_pool.float().contiguous()
    out = torch.empty((batch, n_q_heads, n_qb, n_kb), dtype=torch.float32, device=q_pool.device)
    if out.numel() == 0:
        return out
    grid = (batch * n_q_heads, triton.cdiv(n_qb, 16))
    pad = pow2_at_least(dim, 16)
    warps, stages = launch_config("pooled_scores", torch.float32, 16, 32, pad)
    _pooled_scores_kernel[grid](
        q_pool, k_pool, out, n_q_heads, n_qb, n_kb, q_len, kv_len, float(scale),
        GROUP=n_q_heads // n_kv_heads, IS_CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=block_n,
        TM=16, TN=32, HEAD_DIM=dim, HEAD_DIM_PAD=pad, num_warps=warps, num_stages=stages)
    return out
