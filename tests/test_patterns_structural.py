"""Structural patterns: block map == tiles where the token predicate (and causality) holds somewhere."""

import math

import pytest
import torch

from sparse_attn import TokenLayout
from sparse_attn.patterns import (Dense, MultiDiagonal, SinkLocal, Skip, SlidingWindow, VerticalStripes, Window3D,
                                  get_pattern)


def tiles_from_predicate(mod, q_len, kv_len, block, causal):
    """Plain reference: evaluate the predicate on the whole grid, then any() per tile."""
    bm, bn = block
    i = torch.arange(q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    tok = mod(0, 0, i, j).expand(q_len, kv_len)
    if causal:
        tok = tok & (j <= i + (kv_len - q_len))
    n_qb, n_kb = math.ceil(q_len / bm), math.ceil(kv_len / bn)
    tok = torch.nn.functional.pad(tok, (0, n_kb * bn - kv_len, 0, n_qb * bm - q_len))
    return tok.reshape(n_qb, bm, n_kb, bn).any(3).any(1)


ONE_D = [
    SlidingWindow(left=40, right=7, block_size=32),
    SlidingWindow(left=0, right=0, block_size=16),
    SlidingWindow(left=5, right=100, block_size=(16, 32)),
    SinkLocal(sink=20, window=33, block_size=32),
    SinkLocal(sink=0, window=0, block_size=16),
    VerticalStripes(columns=(3, 64, 150, 199), block_size=32),
    Dense(block_size=32),
    Skip(block_size=32),
]


@pytest.mark.parametrize("pat", ONE_D, ids=lambda p: p.name)
@pytest.mark.parametrize("lens", [(200, 200), (97, 250), (250, 97), (1, 113)])
@pytest.mark.parametrize("causal", [False, True])
def test_1d_block_map_matches_predicate(pat, lens, causal):
    q_len, kv_len = lens
    mask = pat.build_for(q_len, kv_len, causal=causal)
    mask.validate()
    ref = tiles_from_predicate(pat.mask_mod_for(q_len, kv_len), q_len, kv_len, pat.block_pair, causal)
    assert torch.equal(mask.to_block_dense()[0, 0], ref)


LAYOUTS = [
    TokenLayout.video(4, 6, 8, text_len=21, text_position="before"),
    TokenLayout.video(3, 8, 8, text_len=30, text_position="after"),
    TokenLayout.video(5, 4, 8),
]
VIDEO = [MultiDiagonal(frames=1, width=5, block_size=32), MultiDiagonal(frames=None, width=0, block_size=16),
         Window3D(window=(1, 2, 1), block_size=32), Window3D(window=(0, 1, 3), keep_text=False, block_size=16)]


@pytest.mark.parametrize("pat", VIDEO, ids=lambda p: p.name)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["text_before", "text_after", "no_text"])
@pytest.mark.parametrize("causal", [False, True])
def test_video_block_map_matches_predicate(pat, layout, causal):
    n = layout.seq_len
    mask = pat.build_for(n, n, causal=causal, layout=layout)
    ref = tiles_from_predicate(pat.mask_mod_for(n, n, layout), n, n, pat.block_pair, causal)
    assert torch.equal(mask.to_block_dense()[0, 0], ref)
    # build() from tensors gives the same mask
    q = torch.randn(1, 2, n, 16)
    assert torch.equal(pat.build(q, q, causal=causal, layout=layout).to_block_dense(), mask.to_block_dense())


def _python_window3d(layout, window, keep_text, i, j):
    def coords(x):
        v = x - layout.video_start
        return v // (layout.height * layout.width), (v // layout.width) % layout.height, v % layout.width
    ti, tj = layout.is_text(torch.tensor(i)).item(), layout.is_text(torch.tensor(j)).item()
    if ti or tj:
        return keep_text
    a, b = coords(i), coords(j)
    return all(abs(x - y) <= w for x, y, w in zip(a, b, window))


def test_window3d_predicate_against_python():
    lay = TokenLayout.video(3, 4, 5, text_len=7, text_position="after")
    pat = Window3D(window=(1, 1, 2), layout=lay)
    i = torch.arange(lay.seq_len)[:, None]
    j = torch.arange(lay.seq_len)[None, :]
    got = pat.mask_mod(0, 0, i, j)
    for a in range(0, lay.seq_len, 3):
        for b in range(lay.seq_len):
            assert bool(got[a, b]) == _python_window3d(lay, (1, 1, 2), True, a, b)


def test_multi_diagonal_predicate_is_frame_periodic():
    lay = TokenLayout.video(6, 4, 4)  # 16 tokens per frame
    pat = MultiDiagonal(frames=2, width=1, keep_text=False, layout=lay)
    i = torch.tensor(40)
    keys = torch.arange(lay.seq_len)
    kept = keys[pat.mask_mod(0, 0, i, keys)].tolist()
    expect = sorted(40 + m * 16 + e for m in range(-2, 3) for e in (-1, 0, 1) if 0 <= 40 + m * 16 + e < lay.seq_len)
    assert kept == expect


def test_sink_local_is_a_shape_and_stripes_take_text_columns():
    mask = SinkLocal(sink=16, window=16, block_size=16).build_for(128, 128, causal=True)
    dense = mask.to_block_dense()[0, 0]
    assert dense[:, 0].all() and torch.equal(dense.triu(1), torch.zeros_like(dense))
    lay = TokenLayout.video(2, 4, 8, text_len=16, text_position="after")
    stripes = VerticalStripes(layout=lay, block_size=16).build_for(lay.seq_len, lay.seq_len)
    assert stripes.to_block_dense()[0, 0].all(0).tolist() == [False] * 4 + [True]


def test_structural_build_shapes_and_devices():
    q = torch.randn(2, 4, 100, 16)
    k = torch.randn(2, 2, 130, 16)
    mask = get_pattern("sliding_window", left=16, right=16, block_size=32).build(q, k, causal=True)
    assert mask.batch_heads == (1, 1) and mask.seq_lens == (100, 130) and mask.block_size == (32, 32)


def test_structural_errors():
    with pytest.raises(ValueError, match="video layout"):
        MultiDiagonal().build_for(64, 64)
    lay = TokenLayout.video(2, 4, 4)
    with pytest.raises(ValueError, match="layout's 32 tokens"):
        Window3D(layout=lay).build_for(40, 40)
    with pytest.raises(ValueError, match="left"):
        SlidingWindow(left=-1)
    with pytest.raises(TypeError, match="right"):
        SlidingWindow(right=1.5)
    with pytest.raises(ValueError, match="window must be"):
        Window3D(window=(1, 2))
    with pytest.raises(TypeError, match="block_size"):
        SinkLocal(block_size="64")
    with pytest.raises(ValueError, match="text_position"):
        TokenLayout.video(2, 4, 4, text_len=3, text_position="middle")


def test_layout_geometry():
    lay = TokenLayout.video(frames=4, height=8, width=8, text_len=16, text_position="after")
    assert (lay.seq_len, lay.tokens_per_frame, lay.video_start, lay.text_start) == (272, 64, 0, 256)
    t, y, x = lay.coords(torch.tensor([0, 9, 64 + 63]))
    assert t.tolist() == [0, 0, 1] and y.tolist() == [0, 1, 7] and x.tolist() == [0, 1, 7]
    assert lay.is_text(torch.tensor([255, 256, 271])).tolist() == [False, True, True]
    assert TokenLayout.from_dict(lay.to_dict()) == lay
    assert lay.text_blocks(64, 5).tolist() == [False, False, False, False, True]


def test_mask_mod_is_a_flex_attention_mask_mod():
    """FlexAttention's own block mask from our mask_mod keeps the same tiles as our block map."""
    from torch.nn.attention.flex_attention import create_block_mask

    from sparse_attn import BlockSparseMask
    lay = TokenLayout.video(3, 8, 8, text_len=40)
    n = lay.seq_len
    pats = [SlidingWindow(left=40, right=7, block_size=32), SinkLocal(sink=20, window=33, block_size=32),
            VerticalStripes(columns=(3, 100), layout=lay, block_size=32),
            MultiDiagonal(frames=1, width=5, layout=lay, block_size=32),
            Window3D(window=(1, 2, 1), layout=lay, block_size=32), Dense(block_size=32), Skip(block_size=32),
            SinkLocal(sink=20, window=10, block_size=32) | VerticalStripes(columns=(3,), text=False, block_size=32)]
    for pat in pats:
        flex = create_block_mask(pat.mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=32, _compile=False)
        got = BlockSparseMask.from_flex_block_mask(flex).to_block_dense()[0, 0]
        assert torch.equal(got, pat.build_for(n, n, layout=lay).to_block_dense()[0, 0]), pat.name


@pytest.mark.parametrize("lens", [(300, 300), (200, 330), (330, 200)], ids=lambda x: f"{x[0]}x{x[1]}")
@pytest.mark.parametrize("causal", [False, True])
def test_window_patterns_are_token_exact(lens, causal):
    """SlidingWindow and SinkLocal attend exactly their mask_mod (no whole edge tiles), also at Lq != Lk."""
    from oracle import check_close, math_attention
    from sparse_attn import sparse_attention

    q_len, kv_len = lens
    i, j = torch.arange(q_len)[:, None], torch.arange(kv_len)[None]
    for pat in (SlidingWindow(left=50, right=10, block_size=64), SinkLocal(sink=20, window=37, block_size=64)):
        q = torch.randn(1, 2, q_len, 32)
        k, v = torch.randn(1, 2, kv_len, 32), torch.randn(1, 2, kv_len, 32)
        mask = pat.build(q, k, causal=causal)
        tok = pat.mask_mod_for(q_len, kv_len)(0, 0, i, j)
        if causal:
            tok = tok & (j <= i + kv_len - q_len)
        assert torch.equal(mask.to_dense(causal=causal)[0, 0], tok), pat.name
        out = sparse_attention(q, k, v, mask, causal=causal)
        ref, _ = math_attention(q, k, v, tok[None, None])
        check_close(out, ref, math_attention(q, k, v, tok[None, None], dtype=torch.float32)[0])


def test_unions_and_per_head_mixes_keep_exact_members_exact():
    """A union or per-head mix with a token-exact member attends exactly its pairs; tiles a tile-granular
    member keeps stay whole."""
    from sparse_attn.patterns import BlockTopK, PerHead, Union

    q, k = torch.randn(1, 3, 200, 32), torch.randn(1, 3, 200, 32)
    i, j = torch.arange(200)[:, None], torch.arange(200)[None]
    window = SlidingWindow(left=20, right=0, block_size=32)
    topk = BlockTopK(k=1, block_size=32)
    union = Union(patterns=(window, topk)).build(q, k, causal=True)
    win_tok = window.mask_mod_for(200, 200)(0, 0, i, j)
    topk_tiles = topk.block_map(q, k, causal=True, forced=window.block_map(q, k, causal=True)) & \
        ~window.block_map(q, k, causal=True)
    topk_tok = topk_tiles.repeat_interleave(32, 2).repeat_interleave(32, 3)[..., :200, :200]
    assert torch.equal(union.to_dense(), win_tok | topk_tok)
    mixed = PerHead(patterns=(window, Dense(block_size=32), SinkLocal(sink=8, window=16, block_size=32)))
    m = mixed.build(q, k, causal=True)
    dense = m.to_dense(causal=True)[0]
    causal = j <= i
    assert torch.equal(dense[0], win_tok & causal)
    assert torch.equal(dense[1], causal)
    assert torch.equal(dense[2], SinkLocal(sink=8, window=16).mask_mod_for(200, 200)(0, 0, i, j) & causal)
