"""HiP (hierarchical pruning): parameters, JSON, a slow per-block reference of the tree search, recall on
planted structures, and the mask through sparse_attention."""

import json
import math

import pytest
import torch

from sparse_attn import sparse_attention
from sparse_attn.patterns import HiP, get_pattern, pattern_from_json
from sparse_attn.patterns.base import causal_anchors
from sparse_attn.patterns.synthetic import planted_qkv
from sparse_attn.quality import attention_quality


def _hip_ref(q, k, pat, causal):
    """bool ``[B, Hq, NQB, NKB]``: the tree search one query block at a time, with plain Python lists of tiles."""
    bm, bn = pat.block_q, pat.micro
    batch, n_q_heads, q_len, dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    n_qb, n_kb = math.ceil(q_len / bm), math.ceil(kv_len / bn)
    shift = kv_len - q_len
    scale = dim ** -0.5 if pat.scale is None else pat.scale
    keep = torch.zeros(batch, n_kv_heads, n_qb, n_kb, dtype=torch.bool)
    for b in range(batch):
        for h in range(n_kv_heads):
            for qb in range(n_qb):
                q_first, q_last = qb * bm, min(q_len, qb * bm + bm) - 1
                last_key = q_last + shift
                visible = [t for t in range(n_kb) if not causal or t * bn <= last_key]
                lo = max(0, q_first + shift - pat.window)
                window = [t for t in visible if (pat.window > 0 or causal) and t * bn <= last_key
                          and t * bn + bn - 1 >= lo]
                sink = [t for t in visible if t < max(math.ceil(pat.sink / bn), int(causal))]
                cand = [t for t in visible if t not in window and t not in sink]
                if isinstance(pat.mask_k, float):
                    budget = math.ceil(pat.mask_k * len(visible) - 1e-9)
                else:
                    budget = math.ceil(pat.mask_k / bn)
                n, kk = len(cand), min(budget, len(cand))
                groups = [cand[i * n // kk: (i + 1) * n // kk] for i in range(kk)]
                groups = [g for g in groups if g]
                queries = q[b, h * group:(h + 1) * group, q_first:q_last + 1].reshape(-1, dim)  # [G*rows, D]

                def score(tiles):
                    keys = torch.cat([k[b, h, t * bn:min(kv_len, t * bn + bn)] for t in tiles])
                    return float((queries @ keys.mean(0)).max()) * scale

                while any(len(g) > 1 for g in groups):
                    children = []
                    for g in groups:
                        half = (len(g) + 1) // 2
                        children += [g[:half], g[half:]] if len(g) > 1 else [g]
                    children.sort(key=score, reverse=True)
                    groups = children[:kk]
                for t in window + sink + [g[0] for g in groups]:
                    keep[b, h, qb, t] = True
    if causal:
        keep |= causal_anchors(q_len, kv_len, (bm, bn))
    return keep.repeat_interleave(group, dim=1)


def _tokens(tiles, bm, bn, lq, lk):
    """bool ``[B, H, Lq, Lk]`` of a tile map ``[B, H, NQB, NKB]``."""
    return tiles.repeat_interleave(bm, 2)[:, :, :lq].repeat_interleave(bn, 3)[..., :lk]


def _qk(hq=4, hkv=2, lq=200, lk=200, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, hkv, lk, d, generator=gen, dtype=torch.float64)
    return q, k


def test_json_round_trip_and_defaults():
    pat = get_pattern("hip", mask_k=0.25, block_q=64, micro=32, window=64, sink=0, scale=0.5)
    text = pat.to_json()
    assert json.loads(text)["name"] == "hip"
    again = pattern_from_json(text)
    assert again == pat and type(again) is HiP and again.to_json() == text
    assert HiP() == get_pattern("hip") and HiP().block_size == (32, 16)


@pytest.mark.parametrize("kw, error, match", [
    (dict(mask_k=-1), ValueError, "mask_k must be >= 0 keys, got -1"),
    (dict(mask_k=1.5), ValueError, "mask_k as a float must be a fraction in \\(0, 1\\], got 1.5"),
    (dict(mask_k="512"), TypeError, "mask_k must be an int"),
    (dict(mask_k=True), TypeError, "mask_k must be an int"),
    (dict(block_q=24), ValueError, "block_q must be a power of two in \\(16, 32, 64, 128\\), got 24"),
    (dict(micro=8), ValueError, "micro must be a power of two .*got 8"),
    (dict(micro=16.0), TypeError, "micro must be an int"),
    (dict(window=-1), ValueError, "window must be >= 0, got -1"),
    (dict(sink=None), TypeError, "sink must be an int"),
    (dict(scale=0), ValueError, "scale must be a positive float or None, got 0"),
])
def test_bad_parameters(kw, error, match):
    with pytest.raises(error, match=match):
        HiP(**kw)


@pytest.mark.parametrize("causal, lq, lk, kw", [
    (True, 200, 200, dict(mask_k=48, window=32, sink=16)),
    (False, 200, 200, dict(mask_k=48, window=32, sink=16)),
    (True, 100, 260, dict(mask_k=32, window=0, sink=0)),
    (False, 130, 90, dict(mask_k=0.3, window=16, sink=40, block_q=16)),
    (True, 200, 200, dict(mask_k=0.2, window=64, sink=0, micro=32)),
])
def test_matches_slow_reference(causal, lq, lk, kw):
    q, k = _qk(lq=lq, lk=lk)
    pat = HiP(**kw)
    got = pat.block_map(q, k, causal=causal)
    want = _hip_ref(q, k, pat, causal)
    assert got.shape == want.shape and torch.equal(got, want)
    mask = pat.build(q, k, causal=causal)
    assert mask.block_size == (pat.block_q, pat.micro)
    assert torch.equal(mask.to_dense(), _tokens(want, pat.block_q, pat.micro, lq, lk))


def test_budget_is_spent_and_gqa_heads_share_a_mask():
    q, k = _qk(hq=4, hkv=1, lq=512, lk=512)
    keep = HiP(mask_k=64, window=0, sink=0).block_map(q, k)  # non-causal, window=0: the 4 searched tiles only
    assert keep.shape == (1, 4, 16, 32)
    assert (keep[0, 0].sum(-1) == 4).all()
    keep = HiP(mask_k=64, window=0, sink=0).block_map(q, k, causal=True)  # + diagonal and sink anchors
    counts = keep[0, 0].sum(-1)
    assert (counts[4:] == 4 + 3).all() and (counts <= 7).all()
    assert torch.equal(keep[:, :1].expand_as(keep), keep)


def test_recall_on_planted_structures():
    inp = planted_qkv("sink_local", 1024, heads=2, head_dim=32)
    mask = HiP(mask_k=128, window=128).build(inp.q, inp.k, causal=True)
    qual = attention_quality(inp.q, inp.k, inp.v, mask, causal=True)
    assert qual["recall_mean"] >= 0.95 and qual["density_mean"] <= 0.5, qual
    inp = planted_qkv("clusters", 1024, heads=2, head_dim=32, topics=4)
    mask = HiP(mask_k=256, window=64).build(inp.q, inp.k)
    qual = attention_quality(inp.q, inp.k, inp.v, mask)
    assert qual["recall_mean"] >= 0.5 and qual["density_mean"] <= 0.45, qual


@pytest.mark.parametrize("causal", [True, False])
def test_runs_through_sparse_attention(causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 160, 16, generator=gen) for _ in range(3))
    mask = HiP(mask_k=32, window=32).build(q, k, causal=causal)
    out = sparse_attention(q, k, v, mask, causal=causal, backend="torch")
    allowed = _tokens(HiP(mask_k=32, window=32).block_map(q, k, causal=causal), 32, 16, 160, 160)
    if causal:
        allowed = allowed & torch.ones(160, 160, dtype=torch.bool).tril()
    s = (q @ k.transpose(-1, -2)) * 16 ** -0.5
    want = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_chunked_scoring_gives_the_same_mask(monkeypatch):
    import sparse_attn.patterns.hip as hip

    q, k = _qk(hq=2, hkv=2, lq=300, lk=300)
    pat = HiP(mask_k=64, window=32)
    want = pat.block_map(q, k, causal=True)
    monkeypatch.setattr(hip, "_MAX_ELEMS", 1)  # one query block per scoring step
    assert torch.equal(pat.block_map(q, k, causal=True), want)
