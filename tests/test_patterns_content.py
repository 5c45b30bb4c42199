"""Content-based patterns against plain dense PyTorch references (small inputs, random => no ties)."""

import math

import pytest
import torch

from sparse_attn import StripeSparseMask
from sparse_attn.patterns import (BlockTopK, BlockTopP, Dense, ExactImportance, LSEMass, PerHead, SinkLocal, Skip,
                                  SlidingWindow, Union, VerticalSlash, VerticalStripes)
from sparse_attn.layout import TokenLayout


def _qk(b=1, hq=4, hkv=2, lq=160, lk=224, d=16):
    return torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d)


def _visible(lq, lk, bm, bn, causal):
    nq, nk = math.ceil(lq / bm), math.ceil(lk / bn)
    if not causal:
        return torch.ones(nq, nk, dtype=torch.bool)
    q_last = torch.clamp((torch.arange(nq) + 1) * bm, max=lq) - 1
    return (torch.arange(nk) * bn)[None, :] <= q_last[:, None] + (lk - lq)


def _pool(x, block):
    n = math.ceil(x.shape[2] / block)
    return torch.stack([x[:, :, i * block:(i + 1) * block].double().mean(2) for i in range(n)], 2)


def _dense_p(q, k, causal, kv_start=0):
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q.double() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    keep = (j >= kv_start) & ((j <= i + k.shape[2] - q.shape[2]) if causal else True)
    return torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0)


def _tiles(p, bm, bn):
    b, h, lq, lk = p.shape
    nq, nk = math.ceil(lq / bm), math.ceil(lk / bn)
    p = torch.nn.functional.pad(p, (0, nk * bn - lk, 0, nq * bm - lq))
    return p.reshape(b, h, nq, bm, nk, bn).sum((3, 5))


def _anchors_ref(lq, lk, bm, bn):
    """Python loop: per query block, the key blocks of its rows' own positions (diagonal) and key block 0."""
    out = torch.zeros(math.ceil(lq / bm), math.ceil(lk / bn), dtype=torch.bool)
    for i in range(lq):
        if i + lk - lq >= 0:
            out[i // bm, (i + lk - lq) // bn] = True
            out[i // bm, 0] = True
    return out


def _topk_ref(scores, ks, valid, anchors=None):
    """Python loop: per row the ks[h] (or ks[h][m]) best valid tiles; ``anchors`` always kept and counted."""
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            for m in range(scores.shape[2]):
                fixed = torch.zeros_like(valid[m]) if anchors is None else anchors[m] & valid[m]
                idx = (valid[m] & ~fixed).nonzero()[:, 0]
                n = ks[h][m] if isinstance(ks[h], (list, tuple)) else ks[h]
                n = max(0, n - int(fixed.sum()))
                top = idx[torch.argsort(scores[b, h, m, idx], descending=True)[:n]]
                out[b, h, m, top] = True
                out[b, h, m] |= fixed
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_matches_dense_reference(causal):
    q, k = _qk()
    pat = BlockTopK(k=(1, 2, 3, 5), block_size=32)
    mask = pat.build(q, k, causal=causal)
    mask.validate()
    scores = _pool(q, 32) @ _pool(k, 32).repeat_interleave(2, 1).transpose(-1, -2)
    anchors = _anchors_ref(160, 224, 32, 32) if causal else None
    ref = _topk_ref(scores, [1, 2, 3, 5], _visible(160, 224, 32, 32, causal), anchors)
    assert torch.equal(mask.to_block_dense(), ref)
    if not causal:  # budgets respected exactly
        assert mask.counts[0, :, 0].tolist() == [1, 2, 3, 5]


@pytest.mark.parametrize("group", ["mean", "softmax"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_group_selects_once_per_kv_head(group, causal):
    q, k = _qk(hq=6, hkv=2)  # GQA groups of 3 query heads
    mask = BlockTopK(k=(2, 4), block_size=32, group=group).build(q, k, causal=causal)
    mask.validate()
    assert mask.counts.shape[1] == 2  # one selection per kv head: the group's heads share one gather
    vis = _visible(160, 224, 32, 32, causal)
    scores = (_pool(q, 32) @ _pool(k, 32).repeat_interleave(3, 1).transpose(-1, -2) * 16 ** -0.5).view(1, 2, 3, 5, 7)
    scores = scores.masked_fill(~vis, -math.inf)
    combined = scores.mean(2) if group == "mean" else torch.softmax(scores, -1).sum(2).masked_fill(~vis, -math.inf)
    anchors = _anchors_ref(160, 224, 32, 32) if causal else None
    assert torch.equal(mask.to_block_dense(), _topk_ref(combined, [2, 4], vis, anchors))


def test_block_topk_group_with_forced_and_mha():
    q, k = _qk(hq=6, hkv=2)
    grouped = BlockTopK(k=2, block_size=32, group="mean")
    per_q_head = torch.zeros(1, 6, 5, 7, dtype=torch.bool)
    per_q_head[0, 4, 1, 5] = True  # forced for one query head: kept for its whole group (kv head 1)
    keep = grouped.block_map(q, k, forced=per_q_head)
    assert keep.shape[1] == 2 and bool(keep[0, 1, 1, 5])
    back = BlockTopK(k=2, block_size=32).block_map(q, k, forced=keep)  # per-kv-head forced on per-head selection
    assert back.shape[1] == 6 and bool(back[0, 3:, 1, 5].all())
    qm, km = _qk(hq=2, hkv=2)  # no GQA: the same as per-head selection
    assert torch.equal(BlockTopK(k=3, block_size=32, group="softmax").build(qm, km, causal=True).to_block_dense(),
                       BlockTopK(k=3, block_size=32).build(qm, km, causal=True).to_block_dense())
    with pytest.raises(ValueError, match="group"):
        BlockTopK(group="max")
    with pytest.raises(ValueError, match="k must have 1 or 2 entries"):
        BlockTopK(k=(1, 2, 3), block_size=32, group="mean").build(q, k)


@pytest.mark.parametrize("causal", [False, True])
def test_block_topp_group_selects_by_the_groups_mean_mass(causal):
    q, k = _qk(lq=128, lk=200, hq=6, hkv=2)
    per_head = BlockTopP(p=0.7, block_size=32)
    grouped = BlockTopP(p=0.7, block_size=32, group="mean")
    mass = per_head.estimated_mass(q, k, causal).view(1, 2, 3, 4, 7).mean(2)  # [1, Hkv, NQB, NKB]
    anchors = _anchors_ref(128, 200, 32, 32) if causal else None
    want = grouped._select_share(mass, 0.7, "p", q, k, causal, None, 1)
    keep = grouped.block_map(q, k, causal=causal)
    assert keep.shape[1] == 2 and torch.equal(keep, want)
    if anchors is not None:
        assert bool((keep[0] | ~anchors).all())
    with pytest.raises(ValueError, match="group"):
        BlockTopP(group="softmax")


def test_block_topk_fraction_budget():
    q, k = _qk(lq=128, lk=320)
    mask = BlockTopK(k=0.25, block_size=32).build(q, k)
    assert (mask.counts == math.ceil(0.25 * 10)).all()
    causal = BlockTopK(k=0.25, block_size=32).build(q, k, causal=True)  # fraction of the visible blocks
    vis = _visible(128, 320, 32, 32, True).sum(-1)
    assert causal.counts[0, 0].tolist() == [math.ceil(0.25 * int(n)) for n in vis]


@pytest.mark.parametrize("causal", [False, True])
def test_block_topp_matches_dense_reference(causal):
    q, k = _qk(lq=128, lk=200)
    pat = BlockTopP(p=(0.5, 0.7, 0.9, 0.99), temperature=0.5, block_size=32)
    keep = pat.build(q, k, causal=causal).to_block_dense()
    scores = _pool(q, 32) @ _pool(k, 32).repeat_interleave(2, 1).transpose(-1, -2) * 16 ** -0.5 / 0.5
    n_keys = torch.clamp(200 - torch.arange(7) * 32, max=32).double()
    vis = _visible(128, 200, 32, 32, causal)
    mass = torch.softmax((scores + n_keys.log()).masked_fill(~vis, -math.inf), -1)
    anchors = _anchors_ref(128, 200, 32, 32) if causal else torch.zeros(4, 7, dtype=torch.bool)
    for h, p in enumerate((0.5, 0.7, 0.9, 0.99)):
        for m in range(4):
            order = torch.argsort(mass[0, h, m], descending=True)
            want = set(anchors[m].nonzero()[:, 0].tolist())  # always kept; their mass counts toward p
            csum = float(mass[0, h, m, list(want)].sum()) if want else 0.0
            for n, t in enumerate(t for t in order.tolist() if t not in want):
                if (csum >= p and n >= 1) or mass[0, h, m, t] <= 0:  # min_blocks=1: one tile beyond the anchors
                    break
                want.add(t)
                csum += float(mass[0, h, m, t])
            assert set(keep[0, h, m].nonzero()[:, 0].tolist()) == want


def test_block_topp_sub_block_estimate():
    q, k = _qk(lq=100, lk=136)  # ragged: 100 = 3 x 32 + 4, 136 = 4 x 32 + 8
    pat = BlockTopP(p=0.8, estimate_block=8, block_size=32)
    mass = pat.estimated_mass(q, k)
    s = _pool(q, 8) @ _pool(k, 8).repeat_interleave(2, 1).transpose(-1, -2) * 16 ** -0.5  # [1, 4, 13, 17]
    n_keys = torch.clamp(136 - torch.arange(17) * 8, max=8).double()
    prob = torch.softmax(s + n_keys.log(), -1)
    want = torch.zeros(1, 4, 4, 5, dtype=torch.float64)
    for m in range(4):
        rows = list(range(4 * m, min(13, 4 * m + 4)))
        for n in range(5):
            want[0, :, m, n] = prob[0, :, rows][:, :, 4 * n: 4 * n + 4].sum(-1).mean(-1)
    assert torch.allclose(mass.double(), want, atol=1e-5)
    assert torch.allclose(mass.sum(-1), torch.ones(1, 4, 4), atol=1e-5)
    with pytest.raises(ValueError, match="estimate_block must divide"):
        BlockTopP(estimate_block=24, block_size=32)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_importance_matches_dense_reference(causal):
    q, k = _qk(b=2)
    pat = ExactImportance(select=0.3, block_size=32)
    keep = pat.build(q, k, causal=causal).to_block_dense()
    i, j = torch.arange(160)[:, None], torch.arange(224)[None, :]
    seen = (j <= i + 224 - 160) if causal else torch.ones(160, 224, dtype=torch.bool)
    area = _tiles(seen.double()[None, None], 32, 32)  # mean over the visible pairs of each tile
    imp = _tiles(_dense_p(q, k, causal), 32, 32) / area.clamp_min(1)
    vis = _visible(160, 224, 32, 32, causal)
    n_sel = [int(n * 0.3) + 1 for n in vis.sum(-1).tolist()]  # int(NKB * select) + 1 (of the visible blocks)
    anchors = _anchors_ref(160, 224, 32, 32) if causal else None
    assert torch.equal(keep, _topk_ref(imp, [n_sel] * 4, vis, anchors))


def test_exact_importance_isolated_generation_region():
    q, k = _qk(lq=128, lk=128, hq=2, hkv=2)
    gen = 40  # keys 88..127, blocks 2 and 3 (block 2 shared with the prompt)
    keep = ExactImportance(select=0.3, gen_len=gen, block_size=32).build(q, k).to_block_dense()
    area = _tiles(torch.ones(1, 1, 128, 128, dtype=torch.float64), 32, 32)
    base = _topk_ref(_tiles(_dense_p(q, k, False), 32, 32) / area, [int(4 * 0.3) + 1] * 2, _visible(128, 128, 32, 32,
                                                                                                  False))
    gen_area = _tiles((torch.arange(128) >= 128 - gen).double().expand(1, 1, 128, 128), 32, 32)
    gen_imp = _tiles(_dense_p(q, k, False, kv_start=128 - gen), 32, 32) / gen_area.clamp_min(1)
    valid = torch.zeros(4, 4, dtype=torch.bool)
    valid[:, 2:] = True
    iso = _topk_ref(gen_imp, [int(2 * 0.3) + 1] * 2, valid)
    assert torch.equal(keep, base | iso)


@pytest.mark.parametrize("causal", [False, True])
def test_lse_mass_head_adaptive_budgets(causal):
    q, k = _qk(hq=4, hkv=4, lq=256, lk=256)
    k[:, :2] = 2.0 * q[:, :2]  # two heads attend to their own token (high recall), two flat ones
    pat = LSEMass(sparsity=0.75, high=0.875, low=0.5, recall_threshold=0.5, block_size=32)
    keep = pat.build(q, k, causal=causal).to_block_dense()
    w = _tiles(_dense_p(q, k, causal), 32, 32)
    vis = _visible(256, 256, 32, 32, causal)
    n_vis = vis.sum(-1).tolist()
    anchors = _anchors_ref(256, 256, 32, 32) if causal else None
    base = _topk_ref(w, [[max(1, round(0.25 * n)) for n in n_vis]] * 4, vis, anchors)
    recall = (w * base).sum((0, 2, 3)) / w.sum((0, 2, 3))
    n = min(int((recall > 0.5).sum()), 2)
    s = [0.75] * 4
    order = torch.argsort(recall, descending=True).tolist()
    for h in order[:n]:
        s[h] = 0.875
    for h in order[len(order) - n:] if n else []:
        s[h] = 0.5
    ks = [[max(1, round((1 - x) * n)) for n in n_vis] for x in s]
    assert torch.equal(keep, _topk_ref(w, ks, vis, anchors))
    assert n > 0 and len(set(map(tuple, ks))) > 1  # the heads really got different budgets


def test_lse_mass_keeps_text_and_reuses_lse():
    lay = TokenLayout.video(3, 8, 8, text_len=32)
    q, k = torch.randn(1, 2, lay.seq_len, 16), torch.randn(1, 2, lay.seq_len, 16)
    pat = LSEMass(sparsity=0.9, adaptive=False, block_size=32)
    keep = pat.build(q, k, layout=lay).to_block_dense()
    assert keep[..., 0, :].all() and keep[..., :, 0].all()  # text block row and column
    from sparse_attn_kernels.reference_scoring import attention_lse_ref
    lse = attention_lse_ref(q, k, 16 ** -0.5, False)
    assert torch.equal(pat.build(q, k, layout=lay, lse=lse).to_block_dense(), keep)
    with pytest.raises(ValueError, match="lse must have shape"):
        pat.build(q, k, lse=lse[:, :1])


@pytest.mark.parametrize("causal", [False, True])
def test_vertical_slash_matches_dense_reference(causal):
    q, k = _qk(hq=2, hkv=1, lq=192, lk=192)
    pat = VerticalSlash(vertical=(5, 9), slash=(7, 4), last_q=16, sink=0, local=0, block_size=32)
    mask = pat.build(q, k, causal=causal)
    assert isinstance(mask, StripeSparseMask)
    p = _dense_p(q, k, causal)[:, :, -16:]
    vert = p.sum(2)
    rows = torch.arange(176, 192)[:, None]
    diag = (rows - torch.arange(192)[None, :] + 191).expand(16, 192)
    slash = torch.zeros(1, 2, 383, dtype=torch.float64).scatter_add_(-1, diag.reshape(1, 1, -1).expand(1, 2, -1),
                                                                      p.reshape(1, 2, -1))
    for h, (nv, ns) in enumerate(((5, 7), (9, 4))):
        want_v = torch.sort(torch.topk(vert[0, h], nv).indices).values
        want_s = torch.sort(torch.topk(slash[0, h], ns).indices).values - 191
        assert torch.equal(mask.vertical[0, h, : mask.vertical_count[0, h]].long(), want_v)
        assert torch.equal(mask.slash[0, h, : mask.slash_count[0, h]].long(), want_s)


def test_vertical_slash_forced_sink_and_local():
    q, k = _qk(hq=2, hkv=2, lq=100, lk=130)
    mask = VerticalSlash(vertical=6, slash=8, last_q=8, sink=3, local=4, block_size=32).build(q, k, causal=True)
    shift = 30
    for h in range(2):
        v = mask.vertical[0, h, : mask.vertical_count[0, h]].tolist()
        s = mask.slash[0, h, : mask.slash_count[0, h]].tolist()
        assert {0, 1, 2} <= set(v) and len(v) == 6
        assert {-shift, -shift + 1, -shift + 2, -shift + 3} <= set(s) and len(s) == 8
        assert min(s) >= -shift  # no diagonal above the causal one


def test_union_spends_budget_outside_forced_tiles():
    q, k = _qk(lq=256, lk=256)
    forced = SinkLocal(sink=32, window=0, block_size=32)
    mask = Union(patterns=(BlockTopK(k=2, block_size=32), forced)).build(q, k)
    f = forced.build_for(256, 256).to_block_dense()
    assert (mask.counts == f.sum(-1) + 2).all()
    assert (mask.to_block_dense() >= f).all()
    assert (forced | BlockTopK(k=2, block_size=32)) == Union(patterns=(forced, BlockTopK(k=2, block_size=32)))


def test_per_head_mix_is_one_mask():
    q, k = _qk(lq=128, lk=128)
    pats = (Dense(block_size=32), Skip(block_size=32), SlidingWindow(left=0, right=0, block_size=32),
            BlockTopK(k=2, block_size=32))
    mask = PerHead(patterns=pats).build(q, k)
    assert mask.batch_heads == (1, 4)
    assert mask.counts[0, :, 1].tolist() == [4, 0, 1, 2]
    alone = BlockTopK(k=2, block_size=32).build(q, k).to_block_dense()
    assert torch.equal(mask.to_block_dense()[0, 3], alone[0, 3])
    with pytest.raises(ValueError, match="4 heads"):
        PerHead(patterns=pats[:3]).build(q, k)
    with pytest.raises(ValueError, match="one block_size"):
        PerHead(patterns=(Dense(block_size=32), Dense(block_size=64)))


@pytest.mark.parametrize("pat", [BlockTopK(k=2, block_size=32), BlockTopP(p=0.8, block_size=32),
                                 ExactImportance(select=0.3, block_size=32), LSEMass(block_size=32)],
                         ids=lambda p: p.name)
def test_triton_scoring_path_gives_the_same_mask(pat, monkeypatch):
    q, k = _qk(lq=96, lk=128)
    want = pat.build(q, k, causal=True).to_block_dense()
    monkeypatch.setenv("SPARSE_ATTN_SCORING", "triton")
    assert torch.equal(pat.build(q, k, causal=True).to_block_dense(), want)


def test_content_errors():
    q, k = _qk()
    with pytest.raises(ValueError, match="k must have 1 or 4"):
        BlockTopK(k=(1, 2)).build(q, k)
    with pytest.raises(ValueError, match="fraction"):
        BlockTopK(k=1.5)
    with pytest.raises(TypeError, match="k must be"):
        BlockTopK(k="8")
    with pytest.raises(ValueError, match="p must be"):
        BlockTopP(p=0.0)
    with pytest.raises(ValueError, match="select"):
        ExactImportance(select=2)
    with pytest.raises(ValueError, match="rank 4"):
        BlockTopK().build(q[0], k)
    with pytest.raises(ValueError, match="multiple of key heads"):
        BlockTopK().build(q[:, :3], k)
    with pytest.raises(TypeError, match="patterns"):
        Union(patterns=())
    with pytest.raises(TypeError, match="columns"):
        VerticalStripes(columns=5)


@pytest.mark.parametrize("name, kw", [("exact_importance", dict(select=0.2)), ("lse_mass", dict(sparsity=0.8)),
                                      ("block_topk", dict(k=2)), ("block_topp", dict(p=0.5))])
def test_causal_estimates_keep_diagonal_and_sink_tiles(name, kw):
    """Keys of the diagonal and first tiles that every query dislikes: a causal mask still keeps those tiles
    (a causal LM's rows need their own position and the sink), and fixed budgets count them."""
    from sparse_attn.patterns import get_pattern

    torch.manual_seed(0)
    lq = lk = 256
    q = torch.randn(1, 2, lq, 16).abs()
    k = torch.randn(1, 2, lk, 16).abs()
    k[:, :, :32] *= -4.0  # the sink tile scores lowest everywhere
    for m in range(1, 8):  # and half of each diagonal tile scores low too
        k[:, :, 32 * m + 16:32 * (m + 1)] *= -1.0
    keep = get_pattern(name, block_size=32, **kw).build(q, k, causal=True).to_block_dense()
    anchors = _anchors_ref(lq, lk, 32, 32)
    assert keep[..., anchors].all()
    assert not keep[..., ~_visible(lq, lk, 32, 32, True)].any()
    if name in ("exact_importance", "block_topk"):  # a budget of n tiles counts the anchors among them
        n = keep.sum(-1)
        vis = _visible(lq, lk, 32, 32, True).sum(-1)
        want = [int(x * 0.2) + 1 for x in vis.tolist()] if name == "exact_importance" else [2] * 8
        assert n[0, 0].tolist() == [min(v, max(w, int(a))) for v, w, a in zip(vis.tolist(), want,
                                                                               anchors.sum(-1).tolist())]


@pytest.mark.parametrize("name", ["exact_importance", "lse_mass"])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_coverage_keeps_the_fewest_tiles_reaching_the_mass(name, causal):
    """``coverage``: per query block, anchors first, then tiles by exact mass until the share is reached."""
    from sparse_attn.patterns import get_pattern

    q, k = _qk(hq=2, hkv=1, lq=192, lk=192)
    keep = get_pattern(name, coverage=0.7, block_size=32).build(q, k, causal=causal).to_block_dense()
    w = _tiles(_dense_p(q, k, causal), 32, 32)  # [1, 2, 6, 6]
    anchors = _anchors_ref(192, 192, 32, 32) if causal else torch.zeros(6, 6, dtype=torch.bool)
    for h in range(2):
        for m in range(6):
            want = set(anchors[m].nonzero()[:, 0].tolist())
            got = float(w[0, h, m, list(want)].sum()) if want else 0.0
            for t in torch.argsort(w[0, h, m], descending=True).tolist():
                if got >= 0.7 * float(w[0, h, m].sum()) or w[0, h, m, t] <= 0:
                    break
                if t not in want:
                    want.add(t)
                    got += float(w[0, h, m, t])
            assert set(keep[0, h, m].nonzero()[:, 0].tolist()) == want, (h, m)
    with pytest.raises(ValueError, match="coverage"):
        get_pattern(name, coverage=1.5)


def test_per_head_takes_each_query_heads_row_of_a_group_selection():
    q, k = _qk(hq=6, hkv=2)
    grouped = BlockTopK(k=4, block_size=32, group="mean")
    mixed = PerHead((grouped,) * 3 + (SlidingWindow(left=32, right=0, block_size=32),) * 3)
    keep = mixed.block_map(q, k, causal=True)
    group_map = grouped.block_map(q, k, causal=True)  # [1, 2, NQB, NKB]: kv head 0 serves query heads 0-2
    assert keep.shape[1] == 6
    assert not torch.equal(group_map[:, 0], group_map[:, 1])  # the two groups chose differently
    for h in range(3):
        assert torch.equal(keep[:, h], group_map[:, 0])
