"""The SDPA drop-in runs bool attn_masks sparse where they are key padding or block-structured, exactly;
other masks fall back to the original SDPA, counted."""

import pytest
import torch
import torch.nn.functional as F

from sparse_attn import BlockSparseMask
from sparse_attn.integrations.sdpa import patch_sdpa


class Full:
    def build(self, q, k, *, causal=False, layout=None):
        return BlockSparseMask.full(q.shape[2], k.shape[2], 32, device=q.device)


def _key_padding_per_row():
    keep = torch.zeros(2, 1, 1, 128, dtype=torch.bool)
    keep[0, ..., 10:128] = True  # left padding
    keep[1, ..., :77] = True  # right padding
    return keep


def _block_structured():
    tiles = torch.rand(2, 2, 4, 4) < 0.5
    tiles[..., 0] = True
    return tiles.repeat_interleave(32, 2).repeat_interleave(32, 3)


@pytest.mark.parametrize("make_mask", [_key_padding_per_row, _block_structured], ids=["key-padding", "tiles"])
def test_expressible_masks_run_sparse_and_exact(make_mask):
    q, k, v = (torch.randn(2, 2, 128, 32) for _ in range(3))
    keep = make_mask()
    with patch_sdpa(Full()) as patch:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep), atol=1e-5, rtol=1e-4)
    assert patch.stats["sparse"] == 1


def test_other_masks_fall_back_counted():
    q, k, v = (torch.randn(1, 2, 128, 32) for _ in range(3))
    keep = torch.rand(1, 1, 128, 128) < 0.5  # token-level, not tile-structured
    keep[..., 0] = True
    holes = torch.ones(1, 1, 1, 128, dtype=torch.bool)
    holes[..., 40:50] = False  # key padding with a hole
    refs = [F.scaled_dot_product_attention(q, k, v, attn_mask=m) for m in (keep, holes)]
    with patch_sdpa(Full()) as patch:
        outs = [F.scaled_dot_product_attention(q, k, v, attn_mask=m) for m in (keep, holes)]
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))
    assert patch.stats["sparse"] == 0 and patch.stats["fallback:attn_mask"] == 2
