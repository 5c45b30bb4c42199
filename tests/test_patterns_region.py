"""BiFormer region routing against Python-loop references and the fp64 oracle (small inputs, random => no ties)."""

import pytest
import torch

from oracle import check_close, box_ids_reference, math_attention
from sparse_attn import PermutedMask, TokenLayout, sparse_attention
from sparse_attn.patterns import get_pattern, pattern_from_json
from sparse_attn.patterns.region import RegionRouting


def _ref_ids(lay, shape):
    return box_ids_reference(lay, shape)


def _ref_routing(q, k, lay, shape, topk, keep_own):
    """bool ``[B, C, C]`` by loops over batch, region and head: fp64 region means, affinity summed over
    query heads, top-k video regions, own region, text rules."""
    ids = _ref_ids(lay, shape)
    n_c, group = int(ids.max()) + 1, q.shape[1] // k.shape[1]
    present = [c for c in range(n_c) if (ids == c).any()]
    video = [c for c in present if not (lay.text_len and c == 0)]
    out = torch.zeros(q.shape[0], n_c, n_c, dtype=torch.bool)
    for b in range(q.shape[0]):
        qm = {c: [q[b, h, ids == c].double().mean(0) for h in range(q.shape[1])] for c in present}
        km = {c: [k[b, h, ids == c].double().mean(0) for h in range(k.shape[1])] for c in present}
        for a in present:
            if lay.text_len and a == 0:
                out[b, a, present] = True
                continue
            score = {c: sum(float(qm[a][h] @ km[c][h // group]) for h in range(q.shape[1])) for c in video}
            keep = set(sorted(video, key=lambda c: -score[c])[:topk])
            keep |= {a} if keep_own else set()
            keep |= {0} if lay.text_len else set()
            out[b, a, sorted(keep)] = True
    return out, ids


def _ref_token_mask(routed, ids, block):
    """Token-level bool ``[B, L, L]`` of the routing, and its tile superset over the permuted order
    (a tile is kept if any of its token pairs is), both in the original order."""
    tok = routed[:, ids[:, None], ids[None, :]]
    perm = torch.sort(ids, stable=True).indices
    inv = torch.argsort(perm)
    tok_p = tok[:, perm][:, :, perm]
    tiles = torch.zeros_like(tok_p)
    n = ids.shape[0]
    for r in range(0, n, block):
        for c in range(0, n, block):
            tiles[:, r:r + block, c:c + block] = tok_p[:, r:r + block, c:c + block].flatten(1).any(1)[:, None, None]
    return tok, tiles[:, inv][:, :, inv]


CASES = [  # (layout, region_shape, block): aligned image, ragged image, video + text before / after
    (TokenLayout.video(1, 16, 16), (1, 4, 4), 16),
    (TokenLayout.video(1, 12, 10), (4, 4), 16),
    (TokenLayout.video(2, 8, 8, text_len=10), (2, 4, 2), 16),
    (TokenLayout.video(3, 6, 8, text_len=7, text_position="after"), (1, 3, 4), 16),
]


@pytest.mark.parametrize("keep_own", [True, False])
@pytest.mark.parametrize("ci", range(len(CASES)))
def test_mask_matches_loop_reference(ci, keep_own):
    lay, shape, block = CASES[ci]
    gen = torch.Generator().manual_seed(ci)
    q = torch.randn(2, 4, lay.seq_len, 16, generator=gen)
    k = torch.randn(2, 2, lay.seq_len, 16, generator=gen)
    pat = RegionRouting(region_shape=shape, topk=3, keep_own=keep_own, block_size=block, layout=lay)
    routed, ids, perm = pat.region_map(q, k)
    ref_routed, ref_ids = _ref_routing(q, k, lay, pat.region_shape, 3, keep_own)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(perm, torch.sort(ref_ids, stable=True).indices)
    assert torch.equal(routed, ref_routed)
    mask = pat.build(q, k)
    assert isinstance(mask, PermutedMask)
    assert mask.inner.batch_heads == (2, 1) and mask.inner.block_size == (block, block)
    assert torch.equal(mask.perm_q, perm[None, None]) and torch.equal(mask.perm_k, mask.perm_q)
    tok, tiles = _ref_token_mask(ref_routed, ref_ids, block)
    dense = mask.to_dense()[:, 0]
    assert torch.equal(dense, tiles)
    assert bool((dense | ~tok).all())  # superset of the token-level routing
    if ci == 0:  # regions of one block: no ragged tiles, exactly the routing
        assert torch.equal(dense, tok)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ci", [0, 2])
def test_attention_matches_oracle(ci, backend):
    lay, shape, block = CASES[ci]
    gen = torch.Generator().manual_seed(10 + ci)
    q = torch.randn(2, 4, lay.seq_len, 32, generator=gen)
    k, v = torch.randn(2, 2, lay.seq_len, 32, generator=gen), torch.randn(2, 2, lay.seq_len, 32, generator=gen)
    mask = RegionRouting(region_shape=shape, topk=2, block_size=block).build(q, k, layout=lay)
    tok = mask.to_dense()
    assert 0.0 < mask.density() < 1.0
    if lay.text_len:
        assert tok[..., lay.text_start:lay.text_start + lay.text_len].all()  # text keys kept by every query
        assert tok[..., lay.text_start:lay.text_start + lay.text_len, :].all()  # text queries keep everything
    ref, _ = math_attention(q, k, v, tok)
    low, _ = math_attention(q, k, v, tok, dtype=torch.float32)
    check_close(sparse_attention(q, k, v, mask, backend=backend), ref, low)


def _planted(x_weight, amp=4.0, noise=0.3, seed=0):
    """Image 16x16, regions 4x4 (16 regions), Hq = 2, Hkv = 1, D = 32. Keys of region r are ``amp * e_r``;
    queries of region a point at S(a) = {a+1, a+5, a+11} (mod 16) in both heads and at X(a) = {a+2, a+7, a+13}
    with weight +x_weight in head 0 and -x_weight in head 1 (cancelling in the head sum)."""
    lay = TokenLayout.video(1, 16, 16)
    gen = torch.Generator().manual_seed(seed)
    box = (_ref_ids(lay, (1, 4, 4)) - 1)  # region 0..15 per token
    eye = torch.eye(32)
    s_set = torch.stack([(box + o) % 16 for o in (1, 5, 11)])  # [3, L]
    x_set = torch.stack([(box + o) % 16 for o in (2, 7, 13)])
    q_s, q_x = eye[s_set].sum(0), eye[x_set].sum(0)  # [L, 32]
    q = torch.stack([q_s + x_weight * q_x, q_s - x_weight * q_x])[None]
    k = (amp * eye[box])[None, None]
    q = q + noise * torch.randn(q.shape, generator=gen)
    k = k + noise * torch.randn(k.shape, generator=gen)
    v = torch.randn(k.shape, generator=gen)
    return q, k, v, lay, box


@pytest.mark.parametrize("keep_own", [False, True])
def test_routing_recovers_planted_regions(keep_own):
    q, k, _, lay, box = _planted(x_weight=1.5)
    pat = RegionRouting(region_shape=(4, 4), topk=3, keep_own=keep_own, block_size=16, layout=lay)
    routed, _, _ = pat.region_map(q, k)
    want = torch.zeros(16, 16, dtype=torch.bool)
    a = torch.arange(16)
    for o in (1, 5, 11):
        want[a, (a + o) % 16] = True
    if keep_own:
        want[a, a] = True
    assert torch.equal(routed[0, 1:, 1:], want) and not routed[0, 0].any() and not routed[0, :, 0].any()
    assert torch.equal(pat.build(q, k).to_dense()[0, 0], want[box[:, None], box[None, :]])
    # routing is shared by heads (sum of per-head affinities): head 0 alone would route to X(a) instead
    alone, _, _ = pat.region_map(q[:, :1], k)
    for o in (2, 7, 13):
        assert alone[0, 1 + a, 1 + (a + o) % 16].all()


def test_gradients_match_dense_reference():
    lay = TokenLayout.video(1, 8, 12)  # regions of 12 tokens, blocks of 16: ragged tiles
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, lay.seq_len, 16, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    mask = RegionRouting(region_shape=(4, 3), topk=2, block_size=16).build(q, k, layout=lay)
    tok = mask.to_dense()
    assert 0.0 < mask.density() < 1.0
    do = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    grads = torch.autograd.grad((sparse_attention(*leaves, mask, backend="torch") * do).sum(), leaves)
    ref = torch.autograd.grad((math_attention(*leaves, tok)[0] * do).sum(), leaves)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    # the Triton kernels (fp32), tolerance rule for gradients: 3x the fp32 math baseline
    leaves32 = [x.float().requires_grad_() for x in (q, k, v)]
    got = torch.autograd.grad((sparse_attention(*leaves32, mask, backend="triton") * do.float()).sum(), leaves32)
    low = torch.autograd.grad((math_attention(*leaves32, tok, dtype=torch.float32)[0] * do.float()).sum(), leaves32)
    for name, g, r, lo in zip("qkv", got, ref, low):
        check_close(g, r, lo, name=f"d{name}", factor=3.0)


def test_quality_density_and_recall():
    q, k, v, lay, _ = _planted(x_weight=0.0, amp=30.0, noise=0.05)
    mask = RegionRouting(region_shape=(4, 4), topk=3, keep_own=False, block_size=16).build(q, k, layout=lay)
    rep = mask.quality(q, k, v)
    assert torch.allclose(rep["density"], torch.full((1, 2), 3 / 16, dtype=torch.float64))
    assert rep["recall_min"] > 0.95 and rep["error_max"] < 0.1
    # a routing that misses the planted regions (own region only) keeps little of the attention mass
    own = RegionRouting(region_shape=(4, 4), topk=0, block_size=16).build(q, k, layout=lay)
    assert own.quality(q, k, v)["recall_mean"] < 0.2


def test_config_round_trip():
    lay = TokenLayout.video(2, 8, 8, text_len=4)
    pat = get_pattern("region_routing", region_shape=[2, 4, 4], topk=2, keep_own=False, block_size=32, layout=lay)
    assert pattern_from_json(pat.to_json()) == pat
    assert pattern_from_json(RegionRouting().to_json()) == RegionRouting()
    assert RegionRouting(region_shape=(4, 4)).region_shape == (1, 4, 4)
    assert pattern_from_json(pat.to_json()) != RegionRouting(region_shape=(2, 4, 4), topk=2, keep_own=True,
                                                             block_size=32, layout=lay)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(region_shape=(1, 2, 3, 4)), ValueError, r"region_shape must be \(frames, rows, cols\)"),
    (dict(region_shape=(1, 0, 4)), ValueError, r"region_shape\[1\] must be >= 1, got 0"),
    (dict(region_shape=(1, 2.5, 4)), TypeError, r"region_shape\[1\] must be an int"),
    (dict(topk=-1), ValueError, "topk must be >= 0, got -1"),
    (dict(topk=2.0), TypeError, "topk must be an int"),
    (dict(topk=0, keep_own=False), ValueError, "topk must be >= 1 when keep_own=False"),
    (dict(keep_own=1), TypeError, "keep_own must be a bool, got int"),
    (dict(block_size=0), ValueError, r"block_size\[0\] must be >= 1"),
    (dict(layout="image"), TypeError, "layout must be a TokenLayout"),
])
def test_bad_config(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        RegionRouting(**kw)


def test_bad_build_arguments():
    lay = TokenLayout.video(1, 8, 8)
    pat = RegionRouting(region_shape=(4, 4), topk=1, block_size=16)
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="causal=True"):
        pat.build(q, q, causal=True, layout=lay)
    with pytest.raises(ValueError, match="image/video TokenLayout"):
        pat.build(q, q)  # no layout: a text sequence
    with pytest.raises(ValueError, match="image/video TokenLayout"):
        pat.build(q, q, layout=TokenLayout.text(64))
    with pytest.raises(ValueError, match="must equal the layout's 80 tokens"):
        pat.build(q, q, layout=TokenLayout.video(1, 8, 10))
    with pytest.raises(ValueError, match="equal lengths"):
        pat.build(q, torch.randn(1, 2, 80, 16), layout=lay)
    with pytest.raises(ValueError, match="multiple of key heads"):
        pat.build(q, torch.randn(1, 3, 64, 16), layout=lay)
    with pytest.raises(NotImplementedError, match="PermutedMask"):
        pat.block_map(q, q, layout=lay)
