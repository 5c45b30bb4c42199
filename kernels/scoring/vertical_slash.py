"""MInference vertical/slash estimate from the last queries (Triton).

Pass 1 is :func:`attention_lse` on the last ``last_q`` queries. Pass 2: one program per
(batch*query head, key tile) computes ``p = exp(s - lse)`` of those rows over its keys,
stores the column sums (vertical) and adds each element to its diagonal ``s = i - j``
(slash) with atomics.
"""

import torch
import triton
import triton.language as tl

from .._common.attn_jit import load_rows
from .._common.config import check_fits, dot_precision, launch_config, pow2_at_least
from .mass import LOG2E, attention_lse


@triton.jit(do_not_specialize=["q_len", "kv_len", "row0"])
def _vertical_slash_kernel(
    q_ptr, k_ptr, lse_ptr, vert_ptr, slash_ptr, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    n_q_heads, q_len, kv_len, row0, qk_scale,
    GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, ROWS: tl.constexpr, TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = bh // n_q_heads
    h = bh % n_q_heads
    offs_r = tl.arange(0, ROWS)  # [ROWS] rows of the estimate
    offs_m = row0 + offs_r  # query index
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)  # [TILE_N]
    row_ok = offs_m < q_len
    q = load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, row_ok, stride_qm, HEAD_DIM)  # [ROWS, D]
    k = tl.load(k_ptr + b * stride_kb + (h // GROUP) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn
                + offs_d[None, :], mask=(offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    lse = tl.load(lse_ptr + bh * (q_len - row0) + offs_r, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [ROWS, TILE_N]
    keep = row_ok[:, None] & (offs_n[None, :] < kv_len)
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + (kv_len - q_len))
    p = tl.where(keep, tl.math.exp2(qk - lse2[:, None]), 0.0)  # [ROWS, TILE_N]
    tl.store(vert_ptr + bh * kv_len + offs_n, tl.sum(p, 0), mask=offs_n < kv_len)
    diag = offs_m[:, None] - offs_n[None, :] + (kv_len - 1)  # [ROWS, TILE_N] index of s = i - j
    tl.atomic_add(slash_ptr + bh * (q_len + kv_len - 1) + diag, p, mask=keep)


def vertical_slash_scores(q, k, last_q, scale, causal):
    """Triton twin of :func:`vertical_slash_scores_ref` -> ``(vertical [B, Hq, Lk], slash [B, Hq, Lq + Lk - 1])``."""
    batch, n_q_heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    row0 = max(0, q_len - last_q)
    q_tail = q[:, :, row0:]
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    # slicing the last rows keeps the bottom-right causal alignment, so pass 1 runs on the tail alone
    lse = attention_lse(q_tail, k, scale, causal)  # [B, Hq, last_q]
    vertical = torch.zeros((batch, n_q_heads, kv_len), dtype=torch.float32, device=q.device)
    slash = torch.zeros((batch, n_q_heads, q_len + kv_len - 1), dtype=torch.float32, device=q.device)
    if batch * n_q_heads * (q_len - row0) * kv_len == 0:
        return vertical, slash
    grid = (batch * n_q_heads, triton.cdiv(kv_len, 64))
    rows, pad = pow2_at_least(q_len - row0, 16), pow2_at_least(dim, 16)
    check_fits("vertical_slash", q, rows, 64, pad)
    warps, stages = launch_config("vertical_slash", q.dtype, rows, 64, pad)
    _vertical_slash_kernel[grid](
        q, k, lse.contiguous(), vertical, slash, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), n_q_heads, q_len, kv_len, row0, float(scale) * LOG2E,
        GROUP=n_q_heads // k.shape[1], IS_CAUSAL=bool(causal), ROWS=rows, TILE_N=64,
        HEAD_DIM=dim, HEAD_DIM_PAD=pad, DOT_PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return vertical, slash
