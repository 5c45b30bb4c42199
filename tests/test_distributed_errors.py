"""Bad inputs of the context-parallel functions raise ValueError/TypeError naming the argument (one process)."""

import tempfile

import pytest
import torch
import torch.distributed as dist

from sparse_attn import BlockSparseMask, sparse_attention
from sparse_attn.distributed import (contiguous_chunks, head_spans, ring_attention, ring_plan, shard, unshard,
                                     ulysses_attention, zigzag_chunks)
from sparse_attn.distributed.plan import check_chunks


def test_not_initialized():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    yield None
    dist.destroy_process_group()


def test_chunk_helpers():
    chunks = zigzag_chunks(200, 2, 32)
    assert chunks == [[(0, 64), (192, 200)], [(64, 128), (128, 192)]]
    x = torch.arange(200)[None, None, :, None]
    assert torch.equal(unshard([shard(x, c) for c in chunks], chunks), x)
    assert contiguous_chunks([3, 0, 2]) == [[(0, 3)], [(3, 3)], [(3, 5)]]
    with pytest.raises(ValueError, match="without gaps"):
        check_chunks([[(0, 10)], [(12, 20)]], "chunks")
    with pytest.raises(ValueError, match=r"chunks\[1\]"):
        check_chunks([[(0, 10)], [(20, 12)]], "chunks")


def test_head_spans():
    assert head_spans(4, 1, 4) == ([(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 1)] * 4)  # one K/V head, replicated
    assert head_spans(8, 2, 2) == ([(0, 4), (4, 8)], [(0, 1), (1, 2)])
    with pytest.raises(ValueError, match="divisible by the group size"):
        head_spans(6, 2, 4)
    with pytest.raises(ValueError, match="GQA groups"):
        head_spans(12, 3, 2)  # 6 q heads per rank, groups of 4: rank 0 would hold 1.5 groups


def test_world_of_one_equals_single_process(group):
    q = torch.randn(1, 4, 100, 16)
    k, v = torch.randn(2, 1, 2, 100, 16)
    mask = BlockSparseMask.from_dense(torch.rand(1, 2, 4, 4) < 0.5, 32, (100, 100))
    ref, ref_lse = sparse_attention(q, k, v, mask, causal=True, return_lse=True)
    o, lse = ring_attention(q, k, v, mask, causal=True, return_lse=True)
    torch.testing.assert_close(o, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(ulysses_attention(q, k, v, mask, causal=True), ref, rtol=0, atol=1e-6)


def test_ring_errors(group):
    q = torch.randn(1, 4, 100, 16)
    k = v = torch.randn(1, 2, 100, 16)
    mask = BlockSparseMask.full(100, 100, 32)
    with pytest.raises(ValueError, match="chunks borders must be multiples"):
        ring_attention(q, k, v, mask, chunks=[[(0, 40), (40, 100)]])
    with pytest.raises(ValueError, match="global lengths"):
        ring_attention(q, k, v, BlockSparseMask.full(96, 96, 32))
    with pytest.raises(TypeError, match="q must be a 4-D tensor"):
        ring_attention(q[0], k, v, mask)
    with pytest.raises(TypeError, match="one dtype"):
        ring_attention(q.double(), k, v, mask)
    with pytest.raises(ValueError, match="this rank's 96 query"):
        ring_attention(q, k, v, BlockSparseMask.full(96, 96, 32), chunks=[[(0, 96)]])
    with pytest.raises(TypeError, match="plan must be a RingPlan"):
        ring_attention(q, k, v, plan="plan")
    plan = ring_plan(mask, q, k)
    with pytest.raises(ValueError, match=r"plan was built for \(Hq, Hkv\)"):
        ring_attention(q[:, :2], k, v, plan=plan)
    with pytest.raises(TypeError, match="mask must be a BlockSparseMask"):
        ring_attention(q, k, v, "mask")
    with pytest.raises(ValueError, match="mask heads must be"):
        ring_attention(q, k, v, BlockSparseMask.from_dense(torch.ones(1, 3, 4, 4, dtype=torch.bool), 32, (100, 100)))


def test_ulysses_errors(group):
    q = torch.randn(1, 4, 100, 16)
    k = v = torch.randn(1, 2, 100, 16)
    with pytest.raises(ValueError, match="global lengths"):
        ulysses_attention(q, k, v, BlockSparseMask.full(96, 96, 32))
    with pytest.raises(ValueError, match="same sequence shard"):
        ulysses_attention(q, k[:, :, :50], v, None)
    with pytest.raises(TypeError, match="mask must be a BlockSparseMask"):
        ulysses_attention(q, k, v, "mask")
    with pytest.raises(TypeError, match="v must be a 4-D tensor"):
        ulysses_attention(q, k, None)
