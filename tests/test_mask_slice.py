"""Mask slicing: a query range x key range of a mask, exact (shared by ring attention and other splitters)."""

import pytest
import torch

from sparse_attn import BlockSparseMask, StripeSparseMask, sparse_attention

SPANS = [(0, 150, 0, 130), (32, 96, 16, 48), (128, 150, 112, 130), (64, 64, 0, 32), (0, 32, 32, 32),
         (32, 64, 96, 130)]


def _block_masks():
    tok = torch.rand(2, 3, 150, 130) < 0.3
    ranges = torch.tensor([[0, 130], [5, 120]])
    seg_q = torch.tensor([0] * 70 + [1] * 80)[None]
    seg_k = torch.tensor([0] * 60 + [1] * 70)[None]
    tiles = BlockSparseMask.from_dense(torch.rand(1, 3, 5, 9) < 0.5, (32, 16), (150, 130))
    return {
        "bits+window+ranges": BlockSparseMask.from_token_mask(tok, (32, 16)).with_predicates(window=(40, 10),
                                                                                             kv_range=ranges),
        "tiles": tiles,
        "q_range": tiles.with_predicates(q_range=torch.tensor([[10, 140], [0, 150]]), kv_range=ranges),
        "segments": tiles.with_predicates(q_segments=seg_q, kv_segments=seg_k),
    }


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["bits+window+ranges", "tiles", "q_range", "segments"])
def test_block_slice_is_exact(name, causal):
    mask = _block_masks()[name]
    dense = mask.to_dense(causal)
    for a, b, c, d in SPANS:
        part = mask.slice(a, b, c, d, causal=causal)
        assert part.seq_lens == (b - a, d - c)
        assert torch.equal(part.to_dense(), dense[..., a:b, c:d]), (a, b, c, d)


@pytest.mark.parametrize("lens", [(150, 150), (100, 140), (140, 100)])
@pytest.mark.parametrize("causal", [False, True])
def test_stripe_slice_is_exact(lens, causal):
    lq, lk = lens
    vertical = torch.randint(0, lk, (2, 3, 5))
    slash = torch.randint(1 - lk, lq, (1, 3, 6))
    mask = StripeSparseMask.from_vertical_slash(vertical, slash, lens, (32, 16))
    dense = mask.to_dense(causal)
    for a, b, c, d in [(0, lq, 0, lk), (32, 96, 16, 48), (64, lq, 16, lk), (64, 64, 0, 32), (32, 64, 48, 96)]:
        part = mask.slice(a, b, c, d, causal=causal)
        assert torch.equal(part.to_dense(), dense[..., a:b, c:d]), (a, b, c, d)
        if not causal:
            assert isinstance(part, StripeSparseMask)


def test_slice_attention_matches_global_rows():
    """Attention on a slice = the global call's rows restricted to those keys (here: all keys)."""
    mask = _block_masks()["bits+window+ranges"]
    q = torch.randn(2, 3, 150, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 3, 130, 16, dtype=torch.float64)
    full = sparse_attention(q, k, v, mask, causal=True)
    part = sparse_attention(q[:, :, 32:96], k, v, mask.slice(32, 96, 0, 130, causal=True))
    torch.testing.assert_close(part, full[:, :, 32:96], rtol=0, atol=1e-12)


def test_slice_errors():
    mask = BlockSparseMask.full(100, 100, 32)
    with pytest.raises(ValueError, match="q_start must be a multiple"):
        mask.slice(1, 32, 0, 32)
    with pytest.raises(ValueError, match="k_end must be a multiple"):
        mask.slice(0, 32, 0, 40)
    with pytest.raises(ValueError, match="k_start:k_end"):
        mask.slice(0, 32, 64, 32)
    with pytest.raises(TypeError, match="q_end"):
        mask.slice(0, 32.0, 0, 32)
    stripe = StripeSparseMask.from_vertical_slash(torch.tensor([[[3]]]), torch.tensor([[[0]]]), (100, 100), 32)
    with pytest.raises(ValueError, match="q_end must be a multiple"):
        stripe.slice(0, 33, 0, 32)
