"""BlockSparseMask: construction, views, key-major lists, validation and FlexAttention round trips."""

import math
import warnings

import pytest
import torch

from sparse_attn import BlockSparseMask
from sparse_attn.flex import to_flex_block_mask


def python_lists(block_bool):
    """Plain-Python builder of the query-major lists (the metadata oracle)."""
    bm_, hm_, n_q, n_k = block_bool.shape
    rows = [[[[j for j in range(n_k) if block_bool[b, h, i, j]] for i in range(n_q)] for h in range(hm_)]
            for b in range(bm_)]
    width = max(1, max((len(r) for bb in rows for hh in bb for r in hh), default=1))
    counts = torch.tensor([[[len(r) for r in hh] for hh in bb] for bb in rows], dtype=torch.int32)
    indices = torch.tensor([[[r + [0] * (width - len(r)) for r in hh] for hh in bb] for bb in rows],
                           dtype=torch.int32)
    return counts, indices


@pytest.mark.parametrize("shape,density", [((1, 1, 5, 7), 0.5), ((2, 3, 4, 4), 0.1), ((1, 2, 3, 9), 1.0),
                                           ((1, 1, 2, 3), 0.0)])
def test_from_dense_matches_python_builder(shape, density):
    keep = torch.rand(shape) < density
    mask = BlockSparseMask.from_dense(keep, (16, 32), seq_lens=(shape[2] * 16 - 3, shape[3] * 32 - 5))
    counts, indices = python_lists(keep)
    assert torch.equal(mask.counts, counts) and torch.equal(mask.indices, indices)
    assert mask.counts.dtype == torch.int32 and mask.indices.dtype == torch.int32
    assert torch.equal(mask.to_block_dense(), keep)


@pytest.mark.parametrize("q_len,kv_len", [(96, 96), (70, 100), (100, 70)])
def test_tile_share_counts_every_computed_tile_whole(q_len, kv_len):
    torch.manual_seed(0)
    keep = torch.rand(2, 3, -(-q_len // 16), -(-kv_len // 16)) < 0.6
    mask = BlockSparseMask.from_dense(keep, 16, seq_lens=(q_len, kv_len))
    i, j = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    visible = (j <= i + kv_len - q_len).sum().item()
    tile_seen = (j <= i + kv_len - q_len).float()  # a tile is computed when one of its pairs is visible
    n_qb, n_kb = keep.shape[2:]
    tile_seen = torch.nn.functional.pad(tile_seen, (0, n_kb * 16 - kv_len, 0, n_qb * 16 - q_len))
    tile_seen = tile_seen.view(n_qb, 16, n_kb, 16).amax((1, 3)).bool()
    assert mask.tile_share(causal=True) == pytest.approx((keep & tile_seen).sum().item() * 256 / (6 * visible))
    assert mask.tile_share() == pytest.approx(keep.sum().item() * 256 / (6 * q_len * kv_len))
    assert mask.tile_share(causal=True) >= mask.density(causal=True)


def test_width_is_the_largest_row_not_the_number_of_key_blocks():
    keep = torch.zeros(1, 1, 64, 2048, dtype=torch.bool)
    keep[..., :5] = True
    mask = BlockSparseMask.from_dense(keep, 64)
    assert mask.indices.shape == (1, 1, 64, 5)


def test_to_dense_token_level_and_density():
    keep = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)[None, None]
    mask = BlockSparseMask.from_dense(keep, (4, 4), seq_lens=(6, 7))
    tok = mask.to_dense()
    assert tok.shape == (1, 1, 6, 7)
    expected = torch.zeros(6, 7, dtype=torch.bool)
    expected[:4, :4] = True
    expected[4:, :] = True
    assert torch.equal(tok[0, 0], expected)
    assert mask.density() == pytest.approx(expected.float().mean().item())
    causal = mask.to_dense(causal=True)[0, 0]
    i, j = torch.arange(6)[:, None], torch.arange(7)[None, :]
    assert torch.equal(causal, expected & (j <= i + 1))
    # density is over the visible pairs (causally visible with causal), pair_fraction over all pairs
    assert mask.density(causal=True) == pytest.approx(causal.sum().item() / (j <= i + 1).sum().item())
    assert mask.pair_fraction(causal=True) == pytest.approx(causal.double().mean().item())


def test_kv_major_lists_match_python_transpose():
    keep = torch.rand(2, 3, 6, 5) < 0.4
    mask = BlockSparseMask.from_dense(keep, 16)
    counts_t, indices_t = mask.kv_major()
    ref_counts, ref_indices = python_lists(keep.transpose(2, 3))
    assert torch.equal(counts_t, ref_counts) and torch.equal(indices_t, ref_indices)
    assert mask.kv_major()[0] is counts_t  # cached


def test_full_mask_and_repr():
    mask = BlockSparseMask.full(100, 70, (32, 32))
    assert mask.density() == 1.0 and mask.num_blocks == (4, 3)
    text = repr(mask)
    # the ragged key tail is a partial tile ("+"), the others full ("#")
    assert "BlockSparseMask(" in text and "##+" in text and "seq_lens=(100, 70)" in text
    assert len(repr(BlockSparseMask.full(64 * 100, 64, 64)).splitlines()) == 1  # large maps: no picture


def test_empty_masks_print_and_measure():
    mask = BlockSparseMask.from_dense(torch.ones(0, 1, 2, 2, dtype=torch.bool), 16, seq_lens=(32, 32))
    assert mask.density() == 0.0 and "batch_heads=(0, 1)" in repr(mask)
    mask = BlockSparseMask.from_dense(torch.ones(1, 1, 0, 2, dtype=torch.bool), 16, seq_lens=(0, 32))
    assert mask.density() == 0.0 and "blocks=0x2" in repr(mask)


def test_to_device_is_a_noop_on_same_device():
    mask = BlockSparseMask.full(10, 10, 16)
    assert mask.to("cpu") is mask


@pytest.mark.parametrize("counts,indices,message", [
    (torch.tensor([[[1, 3]]]), torch.tensor([[[[0, 1, 0]], [[0, 1, 0]]]]), "indices must have shape"),
    (torch.tensor([[[2, 1]]]), torch.tensor([[[[0, 5], [0, 0]]]]), r"indices must lie in \[0, NKB=2\)"),
    (torch.tensor([[[2, 1]]]), torch.tensor([[[[1, 0], [0, 0]]]]), "strictly increasing"),
    (torch.tensor([[[3, 1]]]), torch.tensor([[[[0, 1], [0, 0]]]]), "counts must lie in"),
    (torch.tensor([[[-1, 1]]]), torch.tensor([[[[0, 1], [0, 0]]]]), "counts must lie in"),
    (torch.tensor([[[1, 1, 1]]]), torch.tensor([[[[0], [0], [0]]]]), "counts must have 2 query blocks"),
])
def test_validate_rejects_bad_lists(counts, indices, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseMask(counts, indices, 16, seq_lens=(32, 20))


def test_constructor_type_errors():
    good_c, good_i = torch.tensor([[[1]]]), torch.tensor([[[[0]]]])
    with pytest.raises(TypeError, match="counts must have dtype"):
        BlockSparseMask(good_c.float(), good_i, 16, (16, 16))
    with pytest.raises(TypeError, match="indices must be a torch.Tensor"):
        BlockSparseMask(good_c, [[[[0]]]], 16, (16, 16))
    with pytest.raises(ValueError, match="counts must have rank 3"):
        BlockSparseMask(good_c[0], good_i, 16, (16, 16))
    with pytest.raises(ValueError, match="block_size\\[0\\] must be >= 1"):
        BlockSparseMask(good_c, good_i, (0, 16), (16, 16))
    with pytest.raises(TypeError, match="seq_lens must be a pair"):
        BlockSparseMask(good_c, good_i, 16, 16)
    with pytest.raises(ValueError, match="block_bool must have 2 x 1 blocks"):
        BlockSparseMask.from_dense(torch.ones(1, 1, 3, 1, dtype=torch.bool), 16, seq_lens=(20, 16))
    with pytest.raises(ValueError, match="block_bool must have shape"):
        BlockSparseMask.from_dense(torch.ones(3, 1, dtype=torch.bool), 16)


@pytest.mark.parametrize("causal,lens", [(False, (100, 130)), (True, (128, 128)), (True, (96, 160))])
def test_flex_block_mask_round_trip(causal, lens):
    keep = torch.rand(2, 3, math.ceil(lens[0] / 32), math.ceil(lens[1] / 32)) < 0.5
    mask = BlockSparseMask.from_dense(keep, 32, seq_lens=lens)
    flex = to_flex_block_mask(mask, causal=causal, num_heads=3)
    assert flex.BLOCK_SIZE == (32, 32) and tuple(flex.seq_lengths) == lens
    # the flex block map holds exactly the blocks that keep at least one token pair
    tok = mask.to_dense(causal=causal)
    n_qb, n_kb = mask.num_blocks
    pad = torch.nn.functional.pad(tok, (0, n_kb * 32 - lens[1], 0, n_qb * 32 - lens[0]))
    touched = pad.reshape(2, 3, n_qb, 32, n_kb, 32).any(5).any(3)
    assert torch.equal(flex.to_dense().bool()[..., :n_qb, :n_kb], touched)
    back = BlockSparseMask.from_flex_block_mask(flex)  # exact: partial blocks keep their bits
    assert torch.equal(back.to_dense(), mask.to_dense(causal=causal))


def test_from_flex_is_exact_for_partial_blocks():
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = create_block_mask(causal, 1, 1, 256, 256, device="cpu", BLOCK_SIZE=64)
    mask = BlockSparseMask.from_flex_block_mask(flex)
    assert torch.equal(mask.to_dense()[0, 0], torch.tril(torch.ones(256, 256, dtype=torch.bool)))
    assert mask.has_bits and mask.bit_words.shape[0] == 4  # the four diagonal tiles
    with pytest.warns(UserWarning, match="over-attends"):
        whole = BlockSparseMask.from_flex_block_mask(flex, partial="keep")
    assert torch.equal(whole.to_block_dense()[0, 0], torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="partial must be"):
        BlockSparseMask.from_flex_block_mask(flex, partial="maybe")
    with pytest.raises(TypeError, match="BlockMask"):
        BlockSparseMask.from_flex_block_mask(torch.ones(2))


def test_flex_mask_mod_states_the_whole_predicate():
    keep = torch.rand(1, 2, 3, 4) < 0.5
    mask = BlockSparseMask.from_dense(keep, 32, seq_lens=(90, 110))
    with pytest.raises(ValueError, match="num_heads"):
        to_flex_block_mask(mask, causal=True)  # two mask heads: query heads must be named
    flex = to_flex_block_mask(mask, causal=True, num_heads=2)
    b, h = torch.zeros((), dtype=torch.long), torch.ones((), dtype=torch.long)
    tok = mask.to_dense(causal=True)[0, 1]
    qi, ki = torch.meshgrid(torch.arange(90), torch.arange(110), indexing="ij")
    assert torch.equal(flex.mask_mod(b, h, qi, ki), tok)
