"""Content patterns spend no budget on padding: under patterns' padding(), tiles without a valid query or key
are never chosen, whatever the padded tokens hold."""

import pytest
import torch

from sparse_attn import get_pattern
from sparse_attn.patterns import padding


@pytest.mark.parametrize("name,kw", [("block_topk", dict(k=3, block_size=32)), ("block_topp", dict(p=0.9, block_size=32)),
                                     ("exact_importance", dict(block_size=32)), ("lse_mass", dict(block_size=32)),
                                     ("chunk_select", dict(block_size=32, chunk_size=64, k=2))])
def test_no_tile_in_padding_is_chosen(name, kw):
    q, k = torch.randn(2, 2, 256, 32), torch.randn(2, 2, 256, 32)
    k[1, :, 100:] *= 50  # loud padded keys would win every score
    q_range = kv_range = torch.tensor([[0, 256], [0, 100]])
    pattern = get_pattern(name, **kw)
    with padding(q_range=q_range, kv_range=kv_range):
        tiles = pattern.build(q, k, causal=True).to_block_dense()
    first_pad = -(-100 // 32)
    assert not tiles[1, :, :, first_pad:].any(), "a tile of padded keys was chosen"
    assert not tiles[1, :, first_pad:, :].any(), "a tile of padded queries was chosen"
    assert tiles[0, :, :, first_pad:].any()  # the unpadded row still chooses there
