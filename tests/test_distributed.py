"""Context parallelism on CPU with gloo: 2 and 4 processes against the single-process result.

One 4-process spawn runs every case (starting a process and its first imports cost seconds); each
case compares this rank's output and gradients with single-process :func:`sparse_attention` under the
fp32 rule of RELIABILITY.md (fp64 oracle, 10x the fp32 single-process error, 3x that for gradients).
The 2-process cases run on two 2-rank subgroups of one 4-process spawn at once. The diffusers cases
(4 processes) run diffusers' own context parallelism (Ulysses and ring) with our processor patch:
``enable_parallelism`` picks ``rank % torch.accelerator.device_count()`` as the device, which divides by
zero on a CPU-only machine, so the workers report one CPU "device" and diffusers' gloo path runs here.
"""

import datetime
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_attn import BlockSparseMask, StripeSparseMask, sparse_attention
from sparse_attn.distributed import (contiguous_chunks, count_bytes, ring_attention, ring_plan, shard,
                                     ulysses_attention, zigzag_chunks)

L, D, BLOCK = 200, 16, 32


def _inputs(hq, hkv, batch=1, length=L):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    q = torch.randn(batch, hq, length, D, generator=g)
    k, v = torch.randn(2, batch, hkv, length, D, generator=g)
    do = torch.randn(batch, hq, length, D, generator=g)
    return q, k, v, do


def _masks(hkv):
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(1, hkv, 7, 7, generator=g) < 0.4
    keep |= torch.eye(7, dtype=torch.bool)
    vertical = torch.randint(0, L, (1, hkv, 4), generator=g)
    slash = torch.randint(-40, 60, (1, hkv, 5), generator=g)

    def docs(b, h, q_idx, kv_idx):  # token-exact: documents of 70 tokens, causal inside (bits)
        return (q_idx // 70 == kv_idx // 70) & ((q_idx - kv_idx) % 3 != 1)
    return {
        "block": BlockSparseMask.from_dense(keep, BLOCK, (L, L)).with_predicates(window=(120, 30)),
        "stripe": StripeSparseMask.from_vertical_slash(vertical, slash, (L, L), BLOCK),
        "token": BlockSparseMask.from_mask_mod(docs, 1, 1, L, L, BLOCK).with_predicates(
            kv_range=torch.tensor([[0, L], [10, 180]])),
        "dense": None,
    }


def _single(q, k, v, do, mask, causal, dtype):
    x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    o = sparse_attention(*x, mask, causal=causal)
    return (o, *torch.autograd.grad(o, x, do.to(dtype)))


def _check(name, got, q, k, v, do, mask, causal, take):
    """``got = (o, dq, dk, dv)`` of this rank vs the single-process fp64 oracle, with ``take`` its shard."""
    ref = _single(q, k, v, do, mask, causal, torch.float64)
    base = _single(q, k, v, do, mask, causal, torch.float32)
    for what, x, r, b, factor in zip("o dq dk dv".split(), got, ref, base, (10, 30, 30, 30)):
        r, b = take(r), take(b)
        assert torch.isfinite(x).all(), f"{name}: {what} not finite"
        err, tol = (x.double() - r).abs().max().item() if x.numel() else 0.0, \
            factor * (b.double() - r).abs().max().item() + 1e-6 if x.numel() else 0.0
        assert err <= tol, f"{name}: {what} error {err:.2e} > {tol:.2e}"


def _ring_case(kind, causal, chunks_fn, hq=4, hkv=2, batch=1, mask_heads=None):
    def run(rank, world):
        q, k, v, do = _inputs(hq, hkv, batch)
        mask = _masks(mask_heads or hkv)[kind]
        chunks = chunks_fn(world)
        take = lambda x: shard(x, chunks[rank])  # noqa: E731
        x = [take(t).requires_grad_() for t in (q, k, v)]
        o, lse = ring_attention(*x, mask, group=_group(), chunks=chunks, causal=causal, return_lse=True)
        grads = torch.autograd.grad(o, x, take(do))
        _check(f"ring {kind}", (o, *grads), q, k, v, do, mask, causal, take)
        _, ref_lse = sparse_attention(q, k, v, mask, causal=causal, return_lse=True)
        ref_lse = take(ref_lse)
        fin = torch.isfinite(ref_lse)
        assert torch.equal(fin, torch.isfinite(lse)), "lse: -inf rows differ"
        assert (lse[fin] - ref_lse[fin]).abs().max().item() <= 2e-4 if fin.any() else True
    return run


def _ulysses_case(kind, causal, lens_fn, hq=4, hkv=2, batch=1, mask_heads=None):
    def run(rank, world):
        q, k, v, do = _inputs(hq, hkv, batch)
        mask = _masks(mask_heads or hkv)[kind]
        chunks = contiguous_chunks(lens_fn(world))
        take = lambda x: shard(x, chunks[rank])  # noqa: E731
        x = [take(t).requires_grad_() for t in (q, k, v)]
        o = ulysses_attention(*x, mask, _group(), causal=causal)
        grads = torch.autograd.grad(o, x, take(do))
        _check(f"ulysses {kind}", (o, *grads), q, k, v, do, mask, causal, take)
    return run


def _ragged(world):
    return {2: [128, 72], 4: [96, 0, 64, 40]}[world]  # an empty shard with 4 ranks


def _zigzag(world):
    return zigzag_chunks(L, world, BLOCK)


def _contig(world):
    return contiguous_chunks(_ragged(world))


def _nothing_sent(rank, world):
    """A block-diagonal mask aligned to the shards needs no key from another rank: nothing is sent."""
    chunks = contiguous_chunks([L // world // BLOCK * BLOCK] * (world - 1) + [L - (world - 1) * (L // world // BLOCK
                                                                                                 * BLOCK)])
    n_qb = -(-L // BLOCK)
    owner = torch.tensor([min(i * BLOCK // (L // world // BLOCK * BLOCK), world - 1) for i in range(n_qb)])
    mask = BlockSparseMask.from_dense((owner[:, None] == owner[None, :])[None, None], BLOCK, (L, L))
    q, k, v, do = _inputs(4, 2)
    x = [shard(t, chunks[rank]).requires_grad_() for t in (q, k, v)]
    with count_bytes() as stats:
        o = ring_attention(*x, mask, group=_group(), chunks=chunks)
        o.backward(shard(do, chunks[rank]))
    assert stats.bytes_sent == 0, f"sent {stats.bytes_sent} bytes"
    full = BlockSparseMask.full(L, L, BLOCK)
    with count_bytes() as dense:
        ring_attention(*(t.detach() for t in x), full, group=_group(), chunks=chunks)
    own = -(-sum(b - a for a, b in chunks[rank]) // BLOCK) * BLOCK  # whole key blocks travel
    assert dense.bytes_sent == 2 * own * 2 * D * 4 * (world - 1), dense.bytes_sent


def _broadcast_content_mask(rank, world):
    """A content-based mask built on rank 0 only (it alone would see all of q/k), shared, then used by the ring."""
    from sparse_attn import get_pattern
    from sparse_attn.distributed import broadcast_mask
    q, k, v, do = _inputs(4, 2)
    built = get_pattern("block_topk", k=0.3, block_size=BLOCK).build(q, k) if rank == 0 else None
    mask = broadcast_mask(built, src=0, group=_group())
    chunks = _zigzag(world)
    take = lambda x: shard(x, chunks[rank])  # noqa: E731
    x = [take(t).requires_grad_() for t in (q, k, v)]
    o = ring_attention(*x, mask, group=_group(), chunks=chunks, causal=True)
    _check("broadcast mask", (o, *torch.autograd.grad(o, x, take(do))), q, k, v, do, mask, True, take)
    stripe = broadcast_mask(_masks(2)["stripe"] if rank == 0 else None, group=_group())
    assert torch.equal(stripe.to_dense(), _masks(2)["stripe"].to_dense())
    token = broadcast_mask(_masks(2)["token"] if rank == 0 else None, group=_group())
    assert torch.equal(token.to_dense(), _masks(2)["token"].to_dense())


def _excluded_keys_never_matter(rank, world):
    """NaN in keys/values the mask excludes (a whole key block, and keys cut by the window inside kept tiles)."""
    keep = torch.ones(1, 1, 7, 7, dtype=torch.bool)
    keep[..., 3] = False
    mask = BlockSparseMask.from_dense(keep, BLOCK, (L, L)).with_predicates(window=(20, 5))
    q, k, v, _ = _inputs(4, 2)
    seen = mask.to_dense(causal=True).any(2).any(1)[0]  # [L]: keys some query sees
    k, v = (torch.where(seen[:, None], t, float("nan")) for t in (k, v))
    chunks = _zigzag(world)
    o = ring_attention(*(shard(t, chunks[rank]) for t in (q, k, v)), mask, group=_group(), chunks=chunks, causal=True)
    ref = sparse_attention(q, torch.nan_to_num(k), torch.nan_to_num(v), mask, causal=True)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, shard(ref, chunks[rank]), rtol=0, atol=1e-5)


def _cross_lengths(rank, world):
    """Lq != Lk: queries and keys sharded differently (kv_chunks), causal bottom-right in global coordinates."""
    lk = 160
    g = torch.Generator().manual_seed(3)
    q, do = torch.randn(2, 1, 4, L, D, generator=g)
    k, v = torch.randn(2, 1, 2, lk, D, generator=g)
    keep = torch.rand(1, 2, 7, 5, generator=g) < 0.6
    mask = BlockSparseMask.from_dense(keep, BLOCK, (L, lk))
    chunks = _contig(world)
    kv_chunks = contiguous_chunks({2: [64, 96], 4: [32, 64, 0, 64]}[world])
    xq = shard(q, chunks[rank]).requires_grad_()
    xk, xv = (shard(t, kv_chunks[rank]).requires_grad_() for t in (k, v))
    o = ring_attention(xq, xk, xv, mask, group=_group(), chunks=chunks, kv_chunks=kv_chunks, causal=True)
    got = (o, *torch.autograd.grad(o, (xq, xk, xv), shard(do, chunks[rank])))
    ref = _single(q, k, v, do, mask, True, torch.float64)
    base = _single(q, k, v, do, mask, True, torch.float32)
    for x, r, b, sp in zip(got, ref, base, (chunks, chunks, kv_chunks, kv_chunks)):
        r, b = shard(r, sp[rank]), shard(b, sp[rank])
        assert x.shape == r.shape and torch.isfinite(x).all()
        if x.numel():  # a rank may hold no queries or no keys
            assert (x.double() - r).abs().max() <= 30 * (b.double() - r).abs().max() + 1e-6


def _llm_prefill(rank, world):
    """Sequence-sharded prefill of a tiny Llama (GQA 4:2): each rank runs its token shard with its positions."""
    from _tiny_llama import tiny_llama
    from _toy_patterns import BandPattern
    from sparse_attn import patch_sdpa
    from sparse_attn.distributed import ring_sdpa
    from sparse_attn.integrations.sdpa import SparseConfig

    model, n = tiny_llama(seed=0), 192
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with patch_sdpa(SparseConfig(BandPattern(block=16, width=2), min_seq_len=16)) as patch:
            ref = model(ids, use_cache=False).logits
        assert patch.stats["sparse"] == 2, patch.stats
        a, b = rank * n // world, (rank + 1) * n // world
        with ring_sdpa(BandPattern(block=16, width=2), _group()):
            out = model(ids[:, a:b], position_ids=torch.arange(a, b)[None], use_cache=False).logits
    torch.testing.assert_close(out, ref[:, a:b], rtol=0, atol=1e-4)


def _plan_reuse(rank, world):
    q, k, v, _ = _inputs(4, 2)
    mask, chunks = _masks(2)["block"], _zigzag(world)
    x = [shard(t, chunks[rank]) for t in (q, k, v)]
    plan = ring_plan(mask, x[0], x[1], group=_group(), chunks=chunks, causal=True)
    a = ring_attention(*x, group=_group(), plan=plan)
    b = ring_attention(*x, mask, group=_group(), chunks=chunks, causal=True)
    assert torch.equal(a, b)


def _wan(heads):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16,
                                 in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                 rope_max_seq_len=32).eval()


def _diffusers_case(order):
    """diffusers' own CP over the whole (4-process) world: 192 tokens, 4 heads; ring shards of 48 tokens."""
    def run(rank, world):
        torch.accelerator.device_count = lambda: 1  # CPU-only: see the module docstring
        from diffusers import ContextParallelConfig
        from _toy_patterns import BandPattern
        from test_integration_diffusers import cfg, wan_inputs
        from sparse_attn.integrations.diffusers import apply

        pattern = lambda: BandPattern(block=16, width=2)  # noqa: E731  (16 divides the ring shards)
        inputs, model = wan_inputs(), _wan(world)
        with apply(model, cfg(pattern())):
            with torch.no_grad():
                ref = model(**inputs)[0]
        model = _wan(world)
        parallel = ContextParallelConfig(ring_degree=world) if order == "ring" else \
            ContextParallelConfig(ulysses_degree=world)
        if order in ("parallel-then-apply", "ring"):
            model.enable_parallelism(config=parallel)
        handle = apply(model, cfg(pattern()))
        if order == "apply-then-parallel":
            model.enable_parallelism(config=parallel)
        with torch.no_grad():
            out = model(**inputs)[0]
        assert handle.stats["sparse"] == 2, handle.stats
        assert (out - ref).abs().max().item() <= 1e-5
    return run


CASES = {
    "ring-block-contig": _ring_case("block", False, _contig),
    "ring-block-zigzag-causal": _ring_case("block", True, _zigzag),
    "ring-stripe-zigzag-causal": _ring_case("stripe", True, _zigzag),
    "ring-stripe-contig-causal": _ring_case("stripe", True, _contig),
    "ring-token-contig-causal-batch2": _ring_case("token", True, _contig, batch=2),
    "ring-block-per-q-head-batch2": _ring_case("block", True, _zigzag, batch=2, mask_heads=4),
    "ring-stripe-per-q-head": _ring_case("stripe", False, _contig, mask_heads=4),
    "ring-dense-zigzag-causal-mqa": _ring_case("dense", True, _zigzag, hq=4, hkv=1),
    "ulysses-block-causal": _ulysses_case("block", True, _ragged),
    "ulysses-stripe": _ulysses_case("stripe", False, _ragged),
    "ulysses-token-batch2": _ulysses_case("token", False, _ragged, batch=2),
    "ulysses-block-per-q-head-batch2": _ulysses_case("block", False, _ragged, batch=2, mask_heads=4),
    "ulysses-mqa-replicated": _ulysses_case("dense", True, _ragged, hq=4, hkv=1),
    "ring-nothing-sent": _nothing_sent,
    "ring-plan-reuse": _plan_reuse,
    "broadcast-content-mask": _broadcast_content_mask,
    "excluded-keys-never-matter": _excluded_keys_never_matter,
    "ring-cross-lengths-causal": _cross_lengths,
    "transformers-ring-prefill": _llm_prefill,
}
WORLD_ONLY = {  # diffusers' CP spans the whole default group: run on the 4-process world only
    "diffusers-ulysses-parallel-then-apply": _diffusers_case("parallel-then-apply"),
    "diffusers-ulysses-apply-then-parallel": _diffusers_case("apply-then-parallel"),
    "diffusers-ring": _diffusers_case("ring"),
}
_GROUP = [None]


def _group():
    """The process group of the running case (a 2-rank subgroup or the 4-rank world)."""
    return _GROUP[0]


def _run(cases, rank, world, group, tag, results):
    _GROUP[0] = group
    for name, case in cases.items():
        try:
            case(rank, world)
            results[f"{tag}:{name}"] = "ok"
        except Exception as e:  # reported per case by the tests below
            results[f"{tag}:{name}"] = f"{type(e).__name__}: {e}"


def _worker(rank, world, store, out_dir):
    """4 processes: every case on two 2-rank subgroups at once ({0, 1} and {2, 3}), then on all 4 ranks
    (one spawn: starting a process and its first imports cost more than the cases)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    results = {}
    _run(CASES, rank % 2, 2, pairs[rank // 2], f"2/{rank // 2}", results)
    dist.barrier()
    _run({**CASES, **WORLD_ONLY}, rank, world, None, "4", results)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _spawn(world=4):
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), tmp), nprocs=world,
                                 join=False, start_method="spawn")
        while not ctx.join(timeout=240):
            pass
        out = {}
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                for name, res in json.load(f).items():
                    out.setdefault(name, [])
                    if res != "ok":
                        out[name].append(f"rank {r}: {res}")
        return out


@pytest.fixture(scope="module")
def results():
    return _spawn()


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes(results, case):
    errors = results[f"2/0:{case}"] + results[f"2/1:{case}"]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("case", list(CASES) + list(WORLD_ONLY))
def test_four_processes(results, case):
    assert not results[f"4:{case}"], "\n".join(results[f"4:{case}"])
