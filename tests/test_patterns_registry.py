"""Registry, JSON round trip of every pattern, and the names promised in docs/patterns.md."""

import json
import pathlib

import pytest

from sparse_attn import TokenLayout, get_pattern, list_patterns, pattern_from_json
from sparse_attn.patterns import BlockTopK, Dense, PerHead, SinkLocal, Union, VerticalStripes

EXAMPLES = {
    "sliding_window": dict(left=64, right=0, block_size=(32, 64)),
    "sink_local": dict(sink=16, window=128),
    "anchor": dict(super_block=256, sink=16, window=64, theta=8.0, pool=64, block_size=32),
    "xattention": dict(threshold=[0.8, 0.95], stride=16, block_size=32, scale=0.2),
    "vertical_stripes": dict(columns=[5, 1, 9], text=False),
    "dense": {}, "skip": {},
    "multi_diagonal": dict(frames=2, width=16, layout=TokenLayout.video(4, 8, 8, text_len=10)),
    "window_3d": dict(window=[1, 2, 3], layout=dict(frames=2, height=4, width=4, text_len=0,
                                                    text_position="after")),
    "block_topk": dict(k=[2, 4, 0.5]), "block_topp": dict(p=0.8, max_blocks=10, temperature=0.5),
    "exact_importance": dict(select=0.5, gen_len=64, block_size=32),
    "lse_mass": dict(sparsity=0.75, adaptive=False), "vertical_slash": dict(vertical=0.05, slash=[100, 200]),
    "union": dict(patterns=[SinkLocal(sink=8), dict(name="block_topk", k=3)]),
    "per_head": dict(patterns=(Dense(), BlockTopK(k=2))),
    "kmeans_routing": dict(q_clusters=8, metric="l2", init="kmeans++", top_p=0.8, cluster_order="label"),
    "equal_size_routing": dict(clusters=8, window=128, shared=True, init="kmeans++"),
    "chunk_select": dict(chunk_size=128, rule="threshold", tau=0.3),
    "dhsa": dict(budget=512, boundary="fixed", chunk_size=96, per_head=False, block_q=128),
    "sparsifiner": dict(budget=[8, 0.25], rank=8, block_size=32, seed=1, exact=False),
    "video_chunk_select": dict(chunk_shape=[2, 4, 4], layout=TokenLayout.video(4, 8, 8, text_len=10)),
    "hip": dict(mask_k=0.25, micro=32, window=64, sink=0),
    "region_routing": dict(region_shape=[2, 4, 4], topk=2, keep_own=False, block_size=32,
                           layout=TokenLayout.video(4, 8, 8, text_len=10)),
}


def test_every_registered_pattern_has_an_example():
    assert sorted(EXAMPLES) == list_patterns()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_json_round_trip(name):
    pat = get_pattern(name, **EXAMPLES[name])
    text = pat.to_json()
    json.loads(text)  # plain JSON
    again = pattern_from_json(text)
    assert again == pat and again.to_json() == text and type(again) is type(pat)
    assert pattern_from_json(json.loads(text)) == pat
    if name != "union" and name != "per_head":
        assert get_pattern(name) == get_pattern(name)  # defaults construct


def test_union_flattens_and_registry_errors():
    a, b, c = SinkLocal(), BlockTopK(), VerticalStripes(columns=(1,))
    assert (a | b | c).patterns == (a, b, c)
    with pytest.raises(ValueError, match="unknown pattern 'nope'"):
        get_pattern("nope")
    with pytest.raises(TypeError, match="name must be a str"):
        get_pattern(3)
    with pytest.raises(ValueError, match="'name' key"):
        pattern_from_json('{"k": 3}')
    with pytest.raises(TypeError, match="patterns\\[0\\]"):
        PerHead(patterns=(3,))
    with pytest.raises(ValueError, match="one block_size"):
        Union(patterns=(SinkLocal(block_size=32), BlockTopK(block_size=64)))


def test_docs_name_every_pattern():
    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "patterns.md"
    text = doc.read_text(encoding="utf-8")
    for name in list_patterns():
        assert f"`{name}`" in text, name
