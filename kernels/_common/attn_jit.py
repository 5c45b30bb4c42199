"""``@triton.jit`` pieces every attention kernel family repeats: the program split, row loads, the
online-softmax step, the non-finite guard and the epilogue.

Used by the block-sparse, stripe-sparse, scoring and decode kernels. Each helper is inlined by the compiler,
so a kernel that calls it compiles to the same code as the lines it replaces (checked with the sm_90 AOT
compiles: registers, spills and shared memory unchanged).
"""

import triton
import triton.language as tl

from .tile_jit import finite_rows


@triton.jit
def split_program(pid, n_inner, n_heads):
    """``(inner, bh, b, h)`` of a 1-D grid whose fastest index is ``inner`` (query block, key slice...) and
    whose slower one is the flat (batch row, head) index ``bh = b * n_heads + h``; ``b``, ``h`` int64."""
    inner = pid % n_inner
    bh = pid // n_inner
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    return inner, bh, b, h


@triton.jit
def load_rows(base_ptr, rows, offs_d, row_ok, stride_m, HEAD_DIM: tl.constexpr):
    """``[len(rows), D]`` tile of rows ``rows`` (int) below ``base_ptr`` (row stride ``stride_m``, unit
    columns); rows outside ``row_ok`` and columns past ``HEAD_DIM`` read 0."""
    ptrs = base_ptr + rows[:, None].to(tl.int64) * stride_m + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def drop_nonfinite(v, keep, bad):
    """Zero the non-finite rows of ``v [N, D]``, so a key that a row excludes never reaches its output, and
    flag in ``bad [BLOCK_M]`` (int32) the rows whose ``keep [BLOCK_M, N]`` holds one."""
    v_ok = finite_rows(v)  # [N]
    bad = tl.maximum(bad, tl.max((keep & (v_ok[None, :] == 0)).to(tl.int32), 1))
    v = tl.where(v_ok[:, None] != 0, v, 0.0)
    return v, bad


@triton.jit
def key_bias(bias_row, offs_n, kv_start, kv_end):
    """``[N]`` float32: the additive bias of keys ``offs_n`` read from ``bias_row`` (natural-log units), in the
    kernels' log2 domain; keys outside ``[kv_start, kv_end)`` read 0 (their scores are masked anyway)."""
    ok = (offs_n >= kv_start) & (offs_n < kv_end)
    return tl.load(bias_row + offs_n, mask=ok, other=0.0) * 1.4426950408889634


@triton.jit
def online_update(acc, l_i, m_i, qk, v, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the scores ``qk [BLOCK_M, N]`` (log2 domain, ``-inf`` = not kept): returns
    ``(acc, l_i, m_i)``. Rows that have seen nothing keep ``m = -inf``; a tile with no kept pair leaves the
    three exactly as they were."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # [BLOCK_M]
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_ref[:, None])  # [BLOCK_M, N]
    alpha = tl.math.exp2(m_i - m_ref)  # [BLOCK_M]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # [BLOCK_M, D]
    return acc, l_i, m_new


@triton.jit
def finish_rows(acc, l_i, m_i, bad):
    """``(o [BLOCK_M, D], lse [BLOCK_M])`` (natural log) of an online softmax: rows that saw no key give
    ``o = 0``, ``lse = -inf``; rows flagged in ``bad`` (they kept a non-finite value) give NaN in both."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]  # [BLOCK_M, D]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # [BLOCK_M]
    o = tl.where(bad[:, None] != 0, float("nan"), o)
    lse = tl.where(bad != 0, float("nan"), lse)
    return o, lse
