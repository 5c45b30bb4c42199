"""Row log-sum-exp and per-tile attention mass from a dense pass (Triton).

AdaSpa / SparseD scoring in two passes without the ``Lq x Lk`` matrix:
``attention_lse`` (pass 1, or reuse the LSE a dense attention already returned) and
``block_mass`` (pass 2): ``W[m, n] = sum over tile (m, n) of exp(s_ij - lse_i)``.
One program per (batch, query head, query block); keys are walked tile by tile.
"""

import torch
import triton
import triton.language as tl

from .._common.attn_jit import load_rows, split_program
from .._common.config import check_fits, dot_precision, launch_config, pow2_at_least

LOG2E = 1.4426950408889634


@triton.jit
def _scores_tile(q, k_base, stride_kn, offs_m, offs_n, kv_len, kv_start, causal_shift, qk_scale,
                 IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Scores (log2 domain) of a [BLOCK_M, TILE_N] tile, -inf where a key is not visible."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                mask=(offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [TILE_N, D]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
    keep = (offs_n[None, :] < kv_len) & (offs_n[None, :] >= kv_start)
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
    return tl.where(keep, qk, float("-inf"))


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_q_blocks", "kv_start"])
def _attention_lse_kernel(
    q_ptr, k_ptr, lse_ptr, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    n_q_heads, q_len, kv_len, n_q_blocks, kv_start, qk_scale,
    GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_bh, b, h = split_program(tl.program_id(0), n_q_blocks, n_q_heads)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q = load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, offs_m < q_len, stride_qm,
                  HEAD_DIM)  # [BLOCK_M, D]
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    causal_shift = kv_len - q_len
    end = kv_len
    if IS_CAUSAL:
        end = tl.minimum(kv_len, pid_m * BLOCK_M + BLOCK_M + causal_shift)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range((kv_start // TILE_N) * TILE_N, end, TILE_N):
        offs_n = start_n + tl.arange(0, TILE_N)
        qk = _scores_tile(q, k_base, stride_kn, offs_m, offs_n, kv_len, kv_start, causal_shift, qk_scale,
                          IS_CAUSAL, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)
        # -- online log-sum-exp; rows that have seen nothing keep m = -inf ----
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_ref) + tl.sum(tl.math.exp2(qk - m_ref[:, None]), 1)
        m_i = m_new
    seen = l_i > 0.0
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


def attention_lse(q, k, scale, causal, kv_start=0):
    """Triton twin of :func:`attention_lse_ref` -> float32 ``[B, Hq, Lq]``."""
    batch, n_q_heads, q_len, dim = q.shape
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    lse = torch.empty((batch, n_q_heads, q_len), dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return lse
    block_m = 64
    n_q_blocks = triton.cdiv(q_len, block_m)
    pad = pow2_at_least(dim, 16)
    check_fits("lse", q, block_m, 64, pad)
    warps, stages = launch_config("lse", q.dtype, block_m, 64, pad)
    _attention_lse_kernel[(batch * n_q_heads * n_q_blocks,)](
        q, k, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        n_q_heads, q_len, k.shape[2], n_q_blocks, int(kv_start), float(scale) * LOG2E,
        GROUP=n_q_heads // k.shape[1], IS_CAUSAL=bool(causal), BLOCK_M=block_m, TILE_N=64,
        HEAD_DIM=dim, HEAD_DIM_PAD=pad, DOT_PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return lse


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_q_blocks", "n_k_blocks", "kv_start"])
def _block_mass_kernel(
    q_ptr, k_ptr, lse_ptr, w_ptr, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    n_q_heads, q_len, kv_len, n_q_blocks, n_k_blocks, kv_start, qk_scale,
    GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_bh, b, h = split_program(pid, n_q_blocks, n_q_heads)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q = load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, offs_m < q_len, stride_qm,
                  HEAD_DIM)  # [BLOCK_M, D]
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * q_len + offs_m, mask=offs_m < q_len, other=float("-inf"))
    # rows that see no key (lse = -inf) contribute 0: subtract +inf instead
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # [BLOCK_M], log2 domain
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    causal_shift = kv_len - q_len
    last_q = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1
    w_row = w_ptr + pid.to(tl.int64) * n_k_blocks
    for kb in range(0, n_k_blocks):
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        visible = (kb * BLOCK_N + BLOCK_N > kv_start)
        if IS_CAUSAL:
            visible = visible & (kb * BLOCK_N <= last_q + causal_shift)
        if visible:
            for sub in tl.static_range(BLOCK_N // TILE_N):
                offs_n = kb * BLOCK_N + sub * TILE_N + tl.arange(0, TILE_N)
                qk = _scores_tile(q, k_base, stride_kn, offs_m, offs_n, kv_len, kv_start, causal_shift, qk_scale,
                                  IS_CAUSAL, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)
                acc += tl.sum(tl.math.exp2(qk - lse2[:, None]), 1)
        tl.store(w_row + kb, tl.sum(acc, 0))


def block_mass(q, k, lse, block_m, block_n, scale, causal, kv_start=0):
    """Triton twin of :func:`block_mass_ref` -> float32 ``[B, Hq, NQB, NKB]`` (block sizes: powers of two >= 16)."""
    batch, n_q_heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    n_qb, n_kb = triton.cdiv(q_len, block_m), triton.cdiv(kv_len, block_n)
    w = torch.empty((batch, n_q_heads, n_qb, n_kb), dtype=torch.float32, device=q.device)
    if w.numel() == 0:
        return w
    pad = pow2_at_least(dim, 16)
    check_fits("mass", q, block_m, block_n, pad)
    warps, stages = launch_config("mass", q.dtype, block_m, block_n, pad)
    _block_mass_kernel[(batch * n_q_heads * n_qb,)](
        q, k, lse.float().contiguous(), w, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), n_q_heads, q_len, kv_len, n_qb, n_kb, int(kv_start),
        float(scale) * LOG2E, GROUP=n_q_heads // k.shape[1], IS_CAUSAL=bool(causal), BLOCK_M=block_m,
        BLOCK_N=block_n, TILE_N=min(block_n, 64), HEAD_DIM=dim, HEAD_DIM_PAD=pad,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return w
