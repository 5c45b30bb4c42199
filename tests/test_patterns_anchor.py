"""AnchorAttention pattern: parameters, JSON, anchors and stripe selection vs plain-Python references."""

import math

import pytest
import torch

from oracle import check_close, math_attention
from sparse_attn import StripeSparseMask, get_pattern, pattern_from_json, sparse_attention
from sparse_attn.patterns import Anchor, Union


def inputs(q_len=160, kv_len=160, heads=2, kv_heads=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, q_len, dim, generator=gen)
    k = torch.randn(1, kv_heads, kv_len, dim, generator=gen)
    v = torch.randn(1, kv_heads, kv_len, dim, generator=gen)
    return q, k, v


def test_json_round_trip_and_registry():
    pat = get_pattern("anchor", super_block=256, sink=8, window=32, theta=3.5, pool=32, block_size=16, scale=0.3)
    again = pattern_from_json(pat.to_json())
    assert again == pat and type(again) is Anchor and again.to_json() == pat.to_json()
    assert Anchor() == get_pattern("anchor")
    assert Anchor.mask_kind == "stripe"


@pytest.mark.parametrize("kw,name", [
    (dict(super_block=100), "super_block"), (dict(super_block=0), "super_block"), (dict(window=0), "window"),
    (dict(sink=-1), "sink"), (dict(pool=0), "pool"), (dict(theta="big"), "theta"), (dict(theta=float("inf")), "theta"),
    (dict(scale=-1.0), "scale"), (dict(super_block=192, pool=128), "super_block"),
])
def test_bad_parameters_name_the_argument(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        Anchor(**kw)


def dense_anchors(q, k, sink, window, causal, scale):
    """max over the sink and the band, from the full score matrix."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    q_len, kv_len = q.shape[2], k.shape[2]
    s = torch.einsum("bhmd,bhnd->bhmn", q.double(), k.double()) * scale
    i, j = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    d = j - i - (kv_len - q_len)
    ok = (j < sink) | ((d > -window) & (d <= 0 if causal else d < window))
    if causal:
        ok &= d <= 0
    return s.masked_fill(~ok, float("-inf")).amax(-1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,kv_len", [(160, 160), (96, 150), (150, 96)])
def test_anchor_is_max_over_sink_and_window(causal, q_len, kv_len):
    q, k, _ = inputs(q_len, kv_len, heads=4, kv_heads=2)
    pat = Anchor(super_block=64, sink=5, window=24, pool=32, block_size=16)
    got = pat.anchors(q, k, causal=causal)
    want = dense_anchors(q, k, 5, 24, causal, 16 ** -0.5)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].double(), want[fin], atol=1e-5, rtol=1e-5)


def slow_selection(q, k, pat, causal):
    """Plain-Python stripes: ``keep[b][h][super_block]`` = set of kept keys."""
    scale = q.shape[-1] ** -0.5
    m = dense_anchors(q, k, pat.sink, pat.window, causal, scale)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    q_len, kv_len = q.shape[2], k.shape[2]
    shift = kv_len - q_len
    out = {}
    for h in range(q.shape[1]):
        for g0 in range(0, q_len, pat.pool):
            rows = list(range(g0, min(q_len, g0 + pat.pool)))
            qbar = sum(q[0, h, i].double() for i in rows) / len(rows)
            fin = [float(m[0, h, i]) for i in rows if math.isfinite(float(m[0, h, i]))]
            if not fin:
                continue
            abar = sum(fin) / len(fin)
            sb = g0 // pat.super_block
            for j in range(pat.sink, kv_len):
                if causal and j > rows[-1] + shift - pat.window:
                    continue
                if float(qbar @ k[0, h, j].double()) * scale + pat.theta * math.log(2) >= abar:
                    out.setdefault((h, sb), set()).add(j)
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_selection_matches_plain_python(causal):
    q, k, _ = inputs(192, 176, heads=2, kv_heads=1, seed=1)
    pat = Anchor(super_block=64, sink=4, window=16, theta=2.5, pool=32, block_size=16)
    keep = pat.column_keep(q, k, causal=causal)  # [B, Hq, NSB, Lk]
    want = slow_selection(q, k, pat, causal)
    n_sel = 0
    for h in range(2):
        for sb in range(keep.shape[2]):
            got = set(torch.nonzero(keep[0, h, sb])[:, 0].tolist())
            assert got == want.get((h, sb), set()), (h, sb)
            n_sel += len(got)
    assert 0 < n_sel < 2 * keep.shape[2] * 176  # a real selection, neither empty nor everything
    # the mask: sink columns + band slashes + each query block's super-block list, minus block-part tiles
    mask = pat.build(q, k, causal=causal)
    assert isinstance(mask, StripeSparseMask) and mask.has_block_columns
    full = mask.to_dense()
    i, j = torch.arange(192)[:, None], torch.arange(176)[None, :]
    d = j - i - (176 - 192)
    band = (d > -16) & ((d <= 0) if causal else (d < 16))
    assert bool(full[..., :4].all()) and bool(full[:, :, band].all())
    vis = (d <= 0) if causal else torch.ones_like(band)
    sel = keep[0][:, i[:, 0] // 64]  # [Hq, Lq, Lk]
    extra = mask.to_dense(causal)[0] & ~band & (j >= 4)
    tiles = mask.block_part().to_dense()[0]  # tiles crossed by the band: block columns dropped there
    assert torch.equal(extra, sel & ~tiles & vis)


def test_runs_through_sparse_attention_and_unions():
    q, k, v = inputs(200, 200, heads=4, kv_heads=2, seed=2)
    pat = Anchor(super_block=64, sink=4, window=32, theta=2.0, pool=32, block_size=32)
    mask = pat.build(q, k, causal=True)
    o = sparse_attention(q, k, v, mask, causal=True)
    ref, _ = math_attention(q, k, v, mask.to_dense(), True)
    low, _ = math_attention(q, k, v, mask.to_dense(), True, dtype=torch.float32)
    check_close(o, ref, low, factor=30.0, dtype=torch.float32)
    keep = (pat | get_pattern("sink_local", sink=4, window=32, block_size=32)).block_map(q, k, causal=True)
    assert keep.shape == (1, 4, 7, 7)
    assert isinstance(Union(patterns=(pat, Anchor(window=16, block_size=32, super_block=64, pool=32))), Union)
    assert 0.0 < mask.density(causal=True) < 1.0


def test_preset_builds_a_stripe_mask_with_block_columns():
    from sparse_attn.integrations.presets import PRESETS, get_preset

    cfg = get_preset("anchor", super_block=256, window=64, pool=64)
    pat = cfg.pattern
    assert isinstance(pat, Anchor) and pat.theta == 12.0 and pat.sink == 64 and PRESETS["anchor"].differs
    assert get_preset("anchor").pattern.super_block == 2048
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 512, 32), torch.randn(1, 2, 512, 32)
    k[:, :, 300] = 3 * q[:, :, 400:].mean(2)  # a key every later row attends to
    mask = pat.build(q, k, causal=True)
    assert isinstance(mask, StripeSparseMask) and mask.block_columns is not None
    dense = mask.to_dense(causal=True)  # [1, 2, 512, 512]
    assert bool(dense[0, :, 400:, 300].all()) and 0 < mask.density(causal=True) < 1
