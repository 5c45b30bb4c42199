"""Per-head pattern search on a synthetic layer whose heads are planted with known structures."""

import pytest
import torch

from sparse_attn import attention_quality
from sparse_attn.patterns import (BlockTopK, KMeansRouting, PatternSearch, SearchPlan, SinkLocal, SlidingWindow,
                                  planted_qkv, search_plan)

CANDIDATES = [SlidingWindow(left=128, right=128), SinkLocal(sink=64, window=128), BlockTopK(k=4)]


@pytest.fixture(scope="module")
def layer():
    """Heads: 0 local band, 1 sink + band, 2 no structure (near-uniform attention)."""
    n = 1024
    loc = planted_qkv("local", n, heads=1, head_dim=32, seed=1)
    sink = planted_qkv("sink_local", n, heads=1, head_dim=32, seed=2)
    gen = torch.Generator().manual_seed(4)
    rq, rk = 0.05 * torch.randn(1, 1, n, 32, generator=gen), 0.05 * torch.randn(1, 1, n, 32, generator=gen)
    q, k = torch.cat([loc.q, sink.q, rq], 1), torch.cat([loc.k, sink.k, rk], 1)
    return q, k, torch.randn(1, 3, n, 32, generator=gen)


def test_search_picks_planted_patterns_and_dense_for_no_structure(layer, tmp_path):
    q, k, v = layer
    plan = search_plan([("blk0", q, k, v), ("blk0", q, k, v)], CANDIDATES, lam=0.1, eps=0.1)
    assert plan.names("blk0") == ["sliding_window", "sink_local", "dense"]
    rows = plan.table()
    assert len(rows) == 3 and all(r["error"] <= 0.1 for r in rows)
    # the plan beats every single pattern applied to all heads on error + lam * density
    plan_cost = sum(r["error"] + 0.1 * r["density"] for r in rows) / 3
    for cand in CANDIDATES:
        qual = attention_quality(q, k, v, cand.build(q, k))
        assert plan_cost < (qual["error"] + 0.1 * qual["density"]).mean().item()
    assert plan_cost < 0.1  # dense everywhere costs lam * 1
    # JSON round trip, and the plan builds the layer's mask in one piece
    path = tmp_path / "plan.json"
    plan.save(path)
    again = SearchPlan.load(path)
    assert again.to_json() == plan.to_json() and again.names("blk0") == plan.names("blk0")
    mask = again.pattern_for("blk0").build(q, k)
    assert mask.batch_heads == (1, 3)
    assert torch.equal(mask.to_block_dense()[0, 0], CANDIDATES[0].build(q, k).to_block_dense()[0, 0])


def test_search_layers_are_independent_and_eps_can_choose_skip(layer):
    q, k, v = layer
    search = PatternSearch(CANDIDATES, lam=5.0, eps=1.0)
    search.observe(0, q, k, v)
    search.observe(1, q[:, :2], k[:, :2], v[:, :2])
    plan = search.plan()
    assert sorted(plan.layers) == ["0", "1"]
    assert plan.names(0)[2] == "skip"  # eps = 1 admits skip (error 1, density 0), and lam is large
    assert len(plan.names(1)) == 2


def test_search_errors(layer):
    q, k, v = layer
    with pytest.raises(ValueError, match="kmeans_routing, whose permuted masks"):
        PatternSearch([KMeansRouting()], causal=True)
    with pytest.raises(ValueError, match="eps"):
        PatternSearch(CANDIDATES, eps=-1)
    with pytest.raises(ValueError, match="no calibration call"):
        PatternSearch(CANDIDATES).plan()
    s = PatternSearch(CANDIDATES)
    s.observe("a", q, k, v)
    with pytest.raises(ValueError, match="heads"):
        s.observe("a", q[:, :1], k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="layer must be one of"):
        s.plan().pattern_for("b")
    with pytest.raises(ValueError, match="version"):
        SearchPlan.from_json('{"layers": {}}')


def test_bar_plan_beats_every_single_pattern_at_equal_density():
    """Issue-6 bar on a planted layer (local, sink_local, clusters, columns heads), L = 1024."""
    from sparse_attn.bench.search_bar import search_vs_single
    res = search_vs_single(1024)
    names, err, dens = res["plan"]
    assert len(names) == 4 and len(set(names)) >= 3, names  # different heads, different choices
    for name, (s_err, s_dens) in res["single"].items():
        assert s_dens >= dens - 1e-9, (name, s_dens, dens)  # the single pattern gets at least the plan's budget
        assert err < s_err, (name, err, s_err)


def _names(patterns):
    out = set()
    for p in patterns:
        out |= _names(p.patterns) if p.name in ("union", "per_head") else {p.name}
    return out


def test_candidate_grid_covers_every_family_and_searches():
    from sparse_attn import TokenLayout
    from sparse_attn.bench.search_bar import planted_layer
    from sparse_attn.patterns import candidate_grid, list_patterns
    from sparse_attn.patterns.grid import COVERED

    assert set(COVERED) == set(list_patterns()) - {"dense", "skip", "union", "per_head"}
    lay = TokenLayout.video(4, 16, 16, text_len=64)
    assert _names(candidate_grid(lay.seq_len, layout=lay)) == set(COVERED)
    causal = candidate_grid(1024, causal=True)
    assert not _names(causal) & {"kmeans_routing", "video_chunk_select", "region_routing", "multi_diagonal"}
    q, k, v = planted_layer(1024, head_dim=32)
    for is_causal in (False, True):
        search = PatternSearch(candidate_grid(1024, causal=is_causal), lam=0.5, eps=0.1, causal=is_causal)
        search.observe(0, q, k, v)
        plan = search.plan()
        assert plan.density() < 0.6 and len(set(plan.names(0))) >= 2, plan.table()
        mask = plan.pattern_for(0).build(q, k, causal=is_causal)
        qual = attention_quality(q, k, v, mask, causal=is_causal)
        assert qual["error_max"] <= 0.1 + 1e-6  # what the search measured is what the plan builds
    with pytest.raises(ValueError, match="layout must be a TokenLayout of seq_len=100"):
        candidate_grid(100, layout=lay)


def _corrupt(edit):
    import copy
    import json

    search = PatternSearch([SlidingWindow(left=64, right=64)], lam=0.1, eps=0.1)
    q = torch.randn(1, 2, 256, 32)
    search.observe(0, q, q, q)
    d = copy.deepcopy(search.plan().to_dict())
    edit(d)
    return json.dumps(d)


@pytest.mark.parametrize("edit,exc,message", [
    (lambda d: d.pop("layers"), ValueError, r"the plan has no \['layers'\]"),
    (lambda d: d.__setitem__("layers", [1]), TypeError, r"plan\['layers'\] must be a dict layer -> list"),
    (lambda d: d["layers"].__setitem__("0", "abc"), TypeError, r"plan\['layers'\]\['0'\] must be a list .*got str"),
    (lambda d: d["layers"].__setitem__("0", []), ValueError, r"plan\['layers'\]\['0'\] must hold one entry per"),
    (lambda d: d["layers"]["0"].__setitem__(1, "abc"), TypeError,
     r"plan\['layers'\]\['0'\]\[1\] must be a dict with 'pattern', 'error' and 'density', got str"),
    (lambda d: d["layers"]["0"][0].pop("error"), ValueError, r"plan\['layers'\]\['0'\]\[0\] has no \['error'\]"),
    (lambda d: d["layers"]["0"][0].__setitem__("density", "0.5"), TypeError,
     r"plan\['layers'\]\['0'\]\[0\]\['density'\] must be a number, got str"),
    (lambda d: d["layers"]["0"][0].__setitem__("density", 2.0), ValueError, r"\['density'\] must be a finite number in"),
    (lambda d: d["layers"]["0"][0]["pattern"].pop("name"), ValueError,
     r"plan\['layers'\]\['0'\]\[0\]\['pattern'\]: a pattern config must be a dict with a 'name' key"),
    (lambda d: d["layers"]["0"][0].__setitem__("pattern", "dense"), ValueError,
     r"plan\['layers'\]\['0'\]\[0\]\['pattern'\]: a pattern config must be a dict"),
    (lambda d: d["layers"]["0"][0]["pattern"].__setitem__("name", "nosuch"), ValueError,
     r"\['pattern'\]: unknown pattern 'nosuch'"),
    (lambda d: d.__setitem__("lam", None), TypeError, r"plan\['lam'\] must be a number, got NoneType"),
    (lambda d: d.pop("eps"), ValueError, r"the plan has no \['eps'\]"),
])
def test_corrupted_plan_json_names_what_is_wrong(edit, exc, message):
    with pytest.raises(exc, match=message):
        SearchPlan.from_json(_corrupt(edit))


def test_plan_json_that_does_not_parse():
    with pytest.raises(ValueError, match="a plan must be JSON text, got text that does not parse"):
        SearchPlan.from_json('{"version": 1, "layers": ')
