"""attention_quality: recall / error / density against a direct dense computation."""

import math

import pytest
import torch

from sparse_attn import BlockSparseMask, StripeSparseMask, attention_quality, sparse_attention


def _direct(q, k, v, keep, causal):
    """Dense reference: per head recall, relative error of the masked softmax, density; keep [.., Lq, Lk]."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    vis = (j <= i + k.shape[2] - q.shape[2]) if causal else torch.ones_like(i * j, dtype=torch.bool)
    p = torch.softmax(s.masked_fill(~vis, -math.inf), -1).nan_to_num(0.0)
    kept = keep & vis
    ps = torch.softmax(s.masked_fill(~kept, -math.inf), -1).nan_to_num(0.0)
    o, os_ = p @ vv, ps @ vv
    rows = vis.any(-1)
    recall = (p * kept).sum(-1)[..., rows].mean(-1)
    err = (os_ - o).flatten(2).norm(dim=-1) / o.flatten(2).norm(dim=-1)
    dens = kept.expand_as(p).sum((-1, -2)).double() / vis.sum()
    return recall, err, dens


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_quality_matches_direct(causal):
    q, k, v = torch.randn(2, 4, 100, 16), torch.randn(2, 2, 130, 16), torch.randn(2, 2, 130, 16)
    keep = torch.rand(2, 2, 4, 5) < 0.5  # per batch, per kv head
    keep[..., 4] = True
    mask = BlockSparseMask.from_dense(keep, 32, (100, 130))
    got = attention_quality(q, k, v, mask, causal=causal, chunk_bytes=4 * 2 * 4 * 130 * 7)  # 7-row chunks
    tok = mask.to_dense().repeat_interleave(2, 1)
    recall, err, dens = _direct(q, k, v, tok, causal)
    assert torch.allclose(got["recall"], recall, atol=1e-5)
    assert torch.allclose(got["error"], err, atol=1e-4)
    assert torch.allclose(got["density"], dens, atol=1e-9)
    # the error is the one of the real sparse kernel output
    o = sparse_attention(q, k, v, mask, causal=causal).double()
    ref = sparse_attention(q, k, v, None, causal=causal).double()
    kernel_err = (o - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1)
    assert torch.allclose(got["error"], kernel_err, atol=1e-4)


def test_stripe_mask_quality_and_dense_none():
    q = k = v = torch.randn(1, 2, 90, 16)
    mask = StripeSparseMask.from_vertical_slash(torch.tensor([[[0, 7]]]), torch.tensor([[[0, 1, 5]]]), (90, 90), 32)
    got = attention_quality(q, k, v, mask, causal=True)
    recall, err, dens = _direct(q, k, v, mask.to_dense(), True)
    assert torch.allclose(got["recall"], recall, atol=1e-5) and torch.allclose(got["density"], dens)
    full = attention_quality(q, k, v, None)
    assert abs(full["recall_mean"] - 1) < 1e-6 and full["error_max"] < 1e-6 and full["density_mean"] == 1.0


def test_empty_mask_has_zero_recall_and_errors():
    q = k = v = torch.randn(1, 1, 64, 16)
    empty = BlockSparseMask.from_dense(torch.zeros(1, 1, 2, 2, dtype=torch.bool), 32, (64, 64))
    got = attention_quality(q, k, v, empty)
    assert got["recall_mean"] == 0.0 and abs(got["error_mean"] - 1.0) < 1e-6 and got["density_mean"] == 0.0
    with pytest.raises(ValueError, match="seq_lens"):
        attention_quality(q, k, v, BlockSparseMask.full(32, 64, 32))
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        attention_quality(q[0], k, v, None)
    with pytest.raises(TypeError, match="BlockSparseMask"):
        attention_quality(q, k, v, "mask")


def test_quality_runs_in_bounded_chunks():
    q, k, v = torch.randn(1, 2, 2000, 32), torch.randn(1, 2, 2000, 32), torch.randn(1, 2, 2000, 32)
    mask = BlockSparseMask.full(2000, 2000, 64)
    small = attention_quality(q, k, v, mask, chunk_bytes=1 << 20)  # ~65 rows per chunk
    assert abs(small["recall_mean"] - 1) < 1e-5 and small["error_max"] < 1e-5
