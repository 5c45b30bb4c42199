"""Planted structure is recovered: recall >= 0.99 where the planted structure is exact for the pattern."""

import pytest
import torch

from sparse_attn import attention_quality
from sparse_attn.patterns import (BlockTopK, ExactImportance, LSEMass, MultiDiagonal, SinkLocal, SlidingWindow,
                                  VerticalSlash, VerticalStripes, Window3D)
from sparse_attn.patterns.synthetic import STRUCTURES, pattern_table, planted_qkv

L = 1024


@pytest.fixture(scope="module")
def planted():
    return {s: planted_qkv(s, L, heads=2, head_dim=32, seed=1) for s in ("local", "sink_local", "columns", "video")}


def _recall(inp, pat, causal=None):
    causal = inp.causal if causal is None else causal
    mask = pat.build(inp.q, inp.k, causal=causal, layout=inp.layout)
    mask.validate()
    return attention_quality(inp.q, inp.k, inp.v, mask, causal=causal)


@pytest.mark.parametrize("structure, pat", [
    ("local", SlidingWindow(left=96, right=0, block_size=32)),
    ("sink_local", SinkLocal(sink=4, window=96, block_size=32)),
    ("sink_local", VerticalSlash(vertical=16, slash=96, block_size=32)),
    ("video", MultiDiagonal(frames=2, width=32, block_size=32)),
    ("video", Window3D(window=(2, 3, 3), block_size=32)),
    ("video", ExactImportance(select=0.15, block_size=32)),
    ("video", LSEMass(sparsity=0.85, high=0.9, low=0.8, block_size=32)),
    ("sink_local", ExactImportance(select=0.3, block_size=32)),
    ("sink_local", LSEMass(sparsity=0.7, adaptive=False, block_size=32)),
    ("video", BlockTopK(k=0.15, block_size=32)),
], ids=lambda x: x if isinstance(x, str) else x.name)
def test_planted_structure_is_recovered(planted, structure, pat):
    q = _recall(planted[structure], pat)
    assert q["recall_min"] >= 0.99, q
    assert q["density_mean"] <= 0.5


def test_planted_columns_recovered_by_stripes(planted):
    inp = planted["columns"]
    q = _recall(inp, VerticalStripes(columns=inp.columns, block_size=32))
    assert q["recall_min"] >= 0.99 and q["density_mean"] <= 0.2


def test_generators_shapes_and_determinism():
    for s in STRUCTURES:
        a = planted_qkv(s, 256, heads=3, head_dim=16, batch=2, seed=3)
        b = planted_qkv(s, 256, heads=3, head_dim=16, batch=2, seed=3)
        assert a.q.shape == (2, 3, 256, 16) and torch.equal(a.k, b.k) and torch.isfinite(a.q).all()
    lay = planted_qkv("video", 512, heads=1).layout
    assert lay.seq_len == 512 and lay.is_video and lay.text_len > 0
    with pytest.raises(ValueError, match="structure"):
        planted_qkv("stars", 512)


def test_pattern_table_rows():
    rows = pattern_table(seq_len=768, names=["sliding_window", "block_topk"], heads=1, head_dim=16)
    assert {r["pattern"] for r in rows} == {"sliding_window", "block_topk"}
    for r in rows:
        assert set(r) >= {"pattern", "structure", "recall", "error", "density", "build_ms"}
        assert 0.0 <= r["density"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 + 1e-6
    with pytest.raises(TypeError, match="names"):
        pattern_table(seq_len=768, names="block_topk")


def test_pattern_table_covers_every_registered_pattern():
    from sparse_attn.patterns import list_patterns
    from sparse_attn.patterns.synthetic import table_configs

    heads = 2
    assert {p.name for p, _, _ in table_configs(512, heads)} == set(list_patterns())
    rows = pattern_table(seq_len=512, heads=heads, head_dim=16)
    assert {r["pattern"] for r in rows} == set(list_patterns())
    for r in rows:
        assert 0.0 <= r["density"] <= 1.0 and 0.0 <= r["recall_min"] <= r["recall"] <= 1.0 + 1e-6, r
    by_name = {r["pattern"]: r for r in rows}
    assert by_name["dense"]["density"] == 1.0 and by_name["dense"]["error"] == pytest.approx(0.0, abs=1e-6)
    assert by_name["skip"]["density"] == 0.0 and by_name["skip"]["recall"] == 0.0
