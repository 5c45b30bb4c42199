"""Scoring kernels (Triton, interpreter on CPU) against their PyTorch references, references against dense math."""

import math

import pytest
import torch

from sparse_attn_kernels import reference_scoring as ref

CASES = [  # (B, Hq, Hkv, Lq, Lk, D, causal)
    pytest.param(1, 2, 2, 97, 97, 32, False, id="odd-self"),
    pytest.param(2, 4, 2, 63, 130, 16, True, id="gqa-causal-lq<lk"),
    pytest.param(1, 2, 1, 150, 70, 24, True, id="mqa-causal-lq>lk"),
]


def dense_probs(q, k, scale, causal, kv_start=0):
    """Plain dense softmax [B, Hq, Lq, Lk] in float64 (rows without a visible key are 0)."""
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    keep = j >= kv_start
    if causal:
        keep = keep & (j <= i + k.shape[2] - q.shape[2])
    return torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0), torch.logsumexp(
        s.masked_fill(~keep, -math.inf), -1)


def tile_sums(p, bm, bn):
    b, h, lq, lk = p.shape
    nq, nk = math.ceil(lq / bm), math.ceil(lk / bn)
    p = torch.nn.functional.pad(p, (0, nk * bn - lk, 0, nq * bm - lq))
    return p.reshape(b, h, nq, bm, nk, bn).sum((3, 5))


@pytest.mark.parametrize("b, hq, hkv, lq, lk, d, causal", CASES)
def test_references_match_dense_math(b, hq, hkv, lq, lk, d, causal):
    q, k = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d)
    scale = d ** -0.5
    p, lse = dense_probs(q, k, scale, causal, kv_start=5)
    got = ref.attention_lse_ref(q, k, scale, causal, kv_start=5, chunk_bytes=4096)
    assert torch.equal(torch.isinf(got), torch.isinf(lse))
    assert torch.allclose(got[~torch.isinf(lse)].double(), lse[~torch.isinf(lse)], atol=1e-4)
    w = ref.block_mass_ref(q, k, got, 32, 16, scale, causal, kv_start=5, chunk_bytes=4096)
    assert torch.allclose(w.double(), tile_sums(p, 32, 16), atol=1e-5)
    vert, slash = ref.vertical_slash_scores_ref(q, k, 8, scale, causal)
    p_last, _ = dense_probs(q[:, :, -8:], k, scale, False)
    if causal:
        p_last = dense_probs(q, k, scale, True)[0][:, :, -8:]
    assert torch.allclose(vert.double(), p_last.sum(2), atol=1e-5)
    for s_off in (0, 3, -2):
        rows = torch.arange(lq - 8, lq)
        cols = rows - s_off
        ok = (cols >= 0) & (cols < lk)
        expect = torch.zeros(b, hq, dtype=torch.float64)
        if ok.any():
            expect = p_last[:, :, ok.nonzero()[:, 0], cols[ok]].sum(-1)
        assert torch.allclose(slash[:, :, s_off + lk - 1].double(), expect, atol=1e-5)
    pooled = ref.block_mean_pool_ref(q, 32)
    assert torch.allclose(pooled[:, :, -1], q[:, :, (math.ceil(lq / 32) - 1) * 32:].mean(2), atol=1e-6)


@pytest.mark.parametrize("b, hq, hkv, lq, lk, d, causal", CASES)
def test_triton_kernels_match_references(b, hq, hkv, lq, lk, d, causal):
    from sparse_attn_kernels.scoring.mass import attention_lse, block_mass
    from sparse_attn_kernels.scoring.pool import block_mean_pool, pooled_block_scores
    from sparse_attn_kernels.scoring.vertical_slash import vertical_slash_scores

    q, k = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d)
    scale = d ** -0.5
    qp, kp = block_mean_pool(q, 32), block_mean_pool(k, 16)
    assert torch.allclose(qp, ref.block_mean_pool_ref(q, 32), atol=1e-6)
    sc = pooled_block_scores(qp, kp, scale, lq, lk, 32, 16, causal)
    sc_ref = ref.pooled_block_scores_ref(qp, kp, scale, lq, lk, 32, 16, causal)
    assert torch.equal(torch.isinf(sc), torch.isinf(sc_ref))
    assert torch.allclose(sc.nan_to_num(0, 0, 0), sc_ref.nan_to_num(0, 0, 0), atol=1e-5)
    lse = attention_lse(q, k, scale, causal, kv_start=3)
    lse_ref = ref.attention_lse_ref(q, k, scale, causal, kv_start=3)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    assert torch.allclose(lse.nan_to_num(0, 0, 0), lse_ref.nan_to_num(0, 0, 0), atol=1e-4)
    w = block_mass(q, k, lse_ref, 32, 16, scale, causal, kv_start=3)
    assert torch.allclose(w, ref.block_mass_ref(q, k, lse_ref, 32, 16, scale, causal, kv_start=3), atol=1e-5)
    vert, slash = vertical_slash_scores(q, k, 16, scale, causal)
    vert_ref, slash_ref = ref.vertical_slash_scores_ref(q, k, 16, scale, causal)
    assert torch.allclose(vert, vert_ref, atol=1e-5) and torch.allclose(slash, slash_ref, atol=1e-5)


def test_triton_block_mass_fp16_and_strided():
    from sparse_attn_kernels.scoring.mass import block_mass

    qkv = torch.randn(1, 96, 3, 2, 32).to(torch.float16)  # [B, L, 3, H, D] packed; slices are strided
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    lse = ref.attention_lse_ref(q, k, 0.2, False)
    got = block_mass(q, k, lse, 32, 32, 0.2, False)
    want = ref.block_mass_ref(q, k, lse, 32, 32, 0.2, False)
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3)
    assert torch.allclose(got.sum(-1), torch.full_like(got.sum(-1), 32.0), atol=2e-2)
