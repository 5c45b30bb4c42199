"""Mask kinds: composite masks reach sparse_attention / attention_quality through the registry, and the
import-cycle check of docs/design.md can fail."""

from pathlib import Path

import pytest
import torch

import sparse_attn
from sparse_attn import BlockSparseMask, PermutedMask, RoutedMask, attention_quality, sparse_attention
from sparse_attn.head_groups import HeadGroupsMask
from sparse_attn.mask_kinds import mask_kind, register_mask_kind, registered_mask_kinds, unregister_mask_kind
from test_docs import ROOT, python_blocks


def _cycle_block():
    """The design.md block that defines ``import_graph`` / ``import_cycles``, run once (it checks the tree)."""
    blocks = [code for _, code, _ in python_blocks((ROOT / "docs" / "design.md").read_text(encoding="utf-8"))
              if "def import_cycles" in code]
    assert len(blocks) == 1
    namespace = {"__name__": "design_cycles"}
    exec(compile(blocks[0], "design.md", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def _package(tmp_path, files):
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "pkg"


@pytest.mark.parametrize("files, cycle", [
    pytest.param({"__init__.py": "", "a.py": "from .b import f\n", "b.py": "def f():\n    from .a import g\n"},
                 {"pkg.a", "pkg.b"}, id="function-local"),
    pytest.param({"__init__.py": "", "a.py": "from .sub import c\n", "sub/__init__.py": "",
                  "sub/c.py": "from .. import a\n"}, {"pkg.a", "pkg.sub.c"}, id="parent-relative"),
    pytest.param({"__init__.py": "", "a.py": "import pkg.b\n", "b.py": "from pkg.a import x\n"},
                 {"pkg.a", "pkg.b"}, id="absolute"),
    pytest.param({"__init__.py": "from .a import x\n", "a.py": "from . import b\n", "b.py": "x = 1\n"},
                 None, id="acyclic"),
])
def test_cycle_check_finds_cycles(tmp_path, files, cycle):
    ns = _cycle_block()
    found = ns["import_cycles"](ns["import_graph"](_package(tmp_path, files), "pkg"))
    assert found == (set() if cycle is None else {frozenset(cycle)})


def test_composite_modules_sit_above_ops_and_quality():
    ns = _cycle_block()
    graph = ns["import_graph"](Path(sparse_attn.__file__).parent, "sparse_attn")
    composite = {"sparse_attn.permuted", "sparse_attn.routed", "sparse_attn.head_groups"}
    for low in ("sparse_attn.ops", "sparse_attn.quality", "sparse_attn.stripe_ops", "sparse_attn.mask_kinds"):
        assert not graph[low] & composite, (low, graph[low])
    assert graph["sparse_attn.mask_kinds"] == set()


def test_the_composite_kinds_are_registered():
    assert set(registered_mask_kinds()) >= {PermutedMask, RoutedMask, HeadGroupsMask}
    assert mask_kind(None) is None and mask_kind(BlockSparseMask.full(8, 8, 8)) is None


class _Dense:
    """A toy kind: dense attention whatever the mask says."""

    seq_lens = None


def test_a_registered_kind_runs_through_sparse_attention_and_quality():
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    calls = []

    def attend(q, k, v, mask, **kw):
        calls.append(("attend", sorted(kw)))
        return sparse_attention(q, k, v, None, **kw)

    def quality(mask, q, k, v, **kw):
        calls.append(("quality", sorted(kw)))
        return attention_quality(q, k, v, None, **kw)

    register_mask_kind(_Dense, attend=attend, quality=quality)
    try:
        torch.testing.assert_close(sparse_attention(q, k, v, _Dense(), causal=True),
                                   sparse_attention(q, k, v, None, causal=True))
        assert attention_quality(q, k, v, _Dense())["recall_mean"] == pytest.approx(1.0)
        with pytest.raises(ValueError, match="window= .* got a _Dense"):
            sparse_attention(q, k, v, _Dense(), window=(4, 0))
    finally:
        unregister_mask_kind(_Dense)
    assert calls == [("attend", ["backend", "causal", "return_lse", "scale"]), ("quality", ["causal", "scale"])]
    with pytest.raises(TypeError, match="mask must be a BlockSparseMask"):
        sparse_attention(q, k, v, _Dense())


def test_a_subclass_of_a_composite_mask_uses_its_base_kind():
    class Tagged(PermutedMask):
        pass

    inner = BlockSparseMask.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool), 8, (8, 8))
    perm = torch.tensor([3, 1, 2, 0, 7, 5, 6, 4])
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    torch.testing.assert_close(sparse_attention(q, k, v, Tagged(inner, perm)),
                               sparse_attention(q, k, v, PermutedMask(inner, perm)))
    with pytest.raises(ValueError, match="causal=True is not supported with a PermutedMask"):
        attention_quality(q, k, v, Tagged(inner, perm), causal=True)


def test_bad_registrations_raise():
    with pytest.raises(TypeError, match="cls must be a class"):
        register_mask_kind("PermutedMask", attend=len, quality=len)
    with pytest.raises(TypeError, match="attend must be callable"):
        register_mask_kind(_Dense, attend=None, quality=len)
    with pytest.raises(TypeError, match="quality must be callable"):
        register_mask_kind(_Dense, attend=len, quality="x")
    with pytest.raises(KeyError, match="_Dense"):
        unregister_mask_kind(_Dense)
    assert _Dense not in registered_mask_kinds()
