"""Key sketches (low-rank projected keys kept per token) and the ``loki`` page selection that reads them."""

import pytest
import torch

from sparse_attn.kvcache import PageSummaries, append_kv, fit_key_basis
from sparse_attn.patterns import LokiSelect, get_decode_pattern

P = 16


def _paged(k, seq, n_phys, gen):
    """The keys of a contiguous ``k [B, Hkv, L, D]`` in a shuffled paged cache and its block table."""
    batch, heads, length, dim = k.shape
    n_log = -(-length // P)
    table = torch.randperm(n_phys, generator=gen)[: batch * n_log].view(batch, n_log).int()
    kc = torch.randn(n_phys, P, heads, dim, generator=gen)  # pages no row owns hold other values
    kpad = torch.nn.functional.pad(k, (0, 0, 0, n_log * P - length))
    for b in range(batch):
        for p in range(n_log):
            kc[table[b, p]] = kpad[b, :, p * P:(p + 1) * P].transpose(0, 1)
    return kc, table


def test_sketch_is_the_keys_projected_on_an_orthonormal_basis():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 90, 32, generator=gen) * torch.linspace(0.2, 3.0, 32)  # channels of unequal energy
    seq = torch.tensor([90, 70])
    s = PageSummaries.from_cache(k, seq, page_size=P, rank=8, sketch_dtype=torch.float32)
    basis = s.sketch.basis  # [Hkv, D, r]
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(8).expand(3, 8, 8), atol=1e-5, rtol=0)
    for b, n in enumerate(seq.tolist()):
        torch.testing.assert_close(s.sketch.proj[b, :, :n], k[b, :, :n] @ basis, atol=1e-5, rtol=1e-5)
    # the basis spans the leading right singular vectors of the valid keys: it keeps more energy than any other
    x = torch.cat([k[0, 0, :90], k[1, 0, :70]])
    best = torch.linalg.svdvals(x)[:8].square().sum()
    torch.testing.assert_close((x @ basis[0]).square().sum(), best, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sketch_kept_incrementally_equals_the_keys_projected(dtype):
    gen = torch.Generator().manual_seed(1)
    cache = torch.zeros(1, 2, 1200, 16)
    v = torch.zeros_like(cache)
    seq = append_kv(cache, v, torch.randn(1, 2, 40, 16, generator=gen), torch.zeros(1, 2, 40, 16),
                    torch.tensor([0], dtype=torch.int32))
    s = PageSummaries.from_cache(cache, seq, page_size=P, rank=4, sketch_dtype=dtype)
    assert s.sketch.fitted_on == 40 and s.sketch.proj.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-5, rtol=2 ** -8)  # bf16 rounding
    for n_new in (1, 3, 50, 1, 17):  # the basis is refitted while it was fitted on few keys
        new = torch.randn(1, 2, n_new, 16, generator=gen)
        before = seq
        seq = append_kv(cache, v, new, torch.zeros_like(new), seq)
        s.update(cache, before, seq)
        n = int(seq[0])
        assert s.sketch.proj.dtype == dtype  # kept through refits
        torch.testing.assert_close(s.sketch.proj[:, :, :n].float(), cache[:, :, :n] @ s.sketch.basis, **tol)
    assert s.sketch.fitted_on == 94  # refitted once the keys doubled (44 -> 94), not at every step
    fresh = PageSummaries.from_cache(cache, seq, page_size=P)
    torch.testing.assert_close(s.mean, fresh.mean)


def test_loki_with_full_rank_picks_the_pages_of_largest_exact_attention_share():
    gen = torch.Generator().manual_seed(2)
    batch, hkv, group, length, dim = 2, 2, 3, 300, 16
    k = torch.randn(batch, hkv, length, dim, generator=gen)
    q = torch.randn(batch, hkv * group, 1, dim, generator=gen) * 2
    seq = torch.tensor([300, 233])
    s = PageSummaries.from_cache(k, seq, page_size=P, rank=dim, sketch_dtype=torch.float32)
    pat = LokiSelect(k=6, sink=0, window=0, rank=dim, granularity="page")
    got = pat.select(q, s, seq)
    for b, n in enumerate(seq.tolist()):
        logits = q[b, :, 0].view(hkv, group, dim) @ k[b, :, :n].transpose(-1, -2) * dim ** -0.5  # [Hkv, G, n]
        share = torch.softmax(logits.double(), -1).sum(1)  # [Hkv, n]
        n_pages = -(-n // P)
        page = torch.nn.functional.pad(share, (0, n_pages * P - n)).view(hkv, n_pages, P).sum(-1)
        current = n_pages - 1  # the page of the query's own key is always kept
        page[:, current] = float("inf")
        want = page.topk(6, -1).indices.sort(-1).values.int()
        assert torch.equal(got[b, :, :6], want), (b, got[b], want)


def test_loki_paged_equals_contiguous_and_ignores_keys_past_the_lengths():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 200, 16, generator=gen)
    seq = torch.tensor([200, 131])
    q = torch.randn(2, 4, 1, 16, generator=gen)
    pat = get_decode_pattern("loki", k=0.4, sink=16, window=16, rank=0.5, granularity="page")
    s = PageSummaries.from_cache(k, seq, page_size=P, rank=pat.sketch_rank(16))
    want = pat.select(q, s, seq)
    kc, table = _paged(k, seq, 40, gen)
    sp = PageSummaries.from_cache(kc, seq, block_table=table, rank=8)
    assert torch.equal(pat.select(q, sp, seq, block_table=table), want)
    poisoned = k.clone()
    poisoned[1, :, 131:] = float("nan")  # keys past row 1's length: never seen by the fit or the scores
    poisoned[1, 0, 140] = float("inf")
    sn = PageSummaries.from_cache(poisoned, seq, page_size=P, rank=8)
    torch.testing.assert_close(sn.sketch.basis, s.sketch.basis, atol=1e-5, rtol=1e-5)
    assert torch.equal(pat.select(q, sn, seq), want)


def test_loki_budget_counts_forced_pages_and_sketch_rank_resolves_fractions():
    pat = LokiSelect(k=0.125, rank=0.25, granularity="page")
    assert pat.sketch_rank(64) == 16 and pat.sketch_rank(128) == 32 and LokiSelect(rank=200).sketch_rank(64) == 64
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 4096, 32, generator=gen)
    seq = torch.tensor([4096])
    s = PageSummaries.from_cache(k, seq, page_size=P, rank=8)
    pages = pat.select(torch.randn(1, 6, 1, 32, generator=gen), s, seq)
    assert pages.shape[-1] == 32 and bool((pages >= 0).all())  # 1/8 of 256 pages, sink + window included
    assert {0, 1, 2, 3} <= set(pages[0, 0].tolist()) and set(range(247, 256)) <= set(pages[0, 0].tolist())


@pytest.mark.parametrize("rank", [0, -1, 1.5, 0.0, True, "16"])
def test_bad_ranks_name_the_argument(rank):
    with pytest.raises(ValueError, match="rank"):
        LokiSelect(rank=rank)
    if not isinstance(rank, float):
        with pytest.raises(ValueError, match="rank must be an int in"):
            PageSummaries.from_cache(torch.randn(1, 1, 32, 8), torch.tensor([32]), page_size=P, rank=rank)


def test_a_selection_that_needs_a_sketch_says_how_to_build_one():
    s = PageSummaries.from_cache(torch.randn(1, 1, 32, 8), torch.tensor([32]), page_size=P)
    with pytest.raises(ValueError, match="rank="):
        LokiSelect(k=1).select(torch.randn(1, 1, 1, 8), s, torch.tensor([32]))


def test_fit_on_no_valid_key_is_a_basis_still():
    basis = fit_key_basis(torch.randn(1, 2, 10, 8), torch.zeros(1, 10, dtype=torch.bool), 3)
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(3).expand(2, 3, 3))


def test_rerank_over_every_page_picks_the_largest_exact_shares_and_paged_equals_contiguous():
    """``rerank`` large enough that every page is a candidate: the choice is the exact one (softmax over the
    candidates' keys, summed over the group), whatever the first scores were."""
    from sparse_attn.patterns import KineticsSelect, QuestSelect

    gen = torch.Generator().manual_seed(5)
    hkv, group, dim = 2, 3, 16
    k = torch.randn(2, hkv, 330, dim, generator=gen)  # a cache that does not end on a page boundary
    q = torch.randn(2, hkv * group, 1, dim, generator=gen) * 2
    seq = torch.tensor([330, 250])
    s = PageSummaries.from_cache(k, seq, page_size=P)
    for pat in (KineticsSelect(k=7, sink=16, window=0, rerank=100.0), QuestSelect(k=7, rerank=100.0)):
        got = pat.select(q, s, seq, k_cache=k)
        for b, n in enumerate(seq.tolist()):
            n_pages = -(-n // P)
            forced = {n_pages - 1} | ({0} if pat.sink else set())
            cands = [p for p in range(n_pages) if p not in forced]
            keys = torch.cat([k[b, :, p * P:(p + 1) * P] for p in cands], 1)  # [Hkv, C*P, D]
            logits = q[b, :, 0].view(hkv, group, dim) @ keys.transpose(-1, -2) * dim ** -0.5
            share = torch.softmax(logits.double(), -1).sum(1).view(hkv, len(cands), P).sum(-1)  # [Hkv, C]
            best = share.topk(7 - len(forced), -1).indices
            want = [sorted(forced | {cands[i] for i in row.tolist()}) for row in best]
            assert got[b].tolist() == [w + [-1] * (got.shape[-1] - len(w)) for w in want], (b, pat.name)
        kc, table = _paged(k, seq, 48, gen)
        sp = PageSummaries.from_cache(kc, seq, block_table=table)
        assert torch.equal(pat.select(q, sp, seq, block_table=table, k_cache=kc), got)


def test_rerank_needs_the_cache_and_a_factor_of_at_least_one():
    from sparse_attn.patterns import KineticsSelect

    k = torch.randn(1, 1, 256, 8)
    s = PageSummaries.from_cache(k, torch.tensor([256]), page_size=P)
    with pytest.raises(ValueError, match="k_cache is needed"):
        KineticsSelect(k=4, sink=0, window=0, rerank=2.0).select(torch.randn(1, 1, 1, 8), s, torch.tensor([256]))
    for bad in (0.5, True, "2"):
        with pytest.raises(ValueError, match="rerank must be a number >= 1"):
            KineticsSelect(rerank=bad)


def test_rows_with_fewer_candidates_than_the_budget_keep_their_forced_pages_and_nothing_past_their_length():
    from sparse_attn.patterns import KineticsSelect

    gen = torch.Generator().manual_seed(6)
    k = torch.randn(2, 1, 320, 8, generator=gen)
    seq = torch.tensor([320, 40])  # row 1: 3 pages, all forced (sink page 0 and the window)
    s = PageSummaries.from_cache(k, seq, page_size=P)
    for rerank in (1.0, 3.0):
        pages = KineticsSelect(k=10, sink=16, window=16, rerank=rerank).select(
            torch.randn(2, 2, 1, 8, generator=gen), s, seq, k_cache=k)
        assert [p for p in pages[1, 0].tolist() if p >= 0] == [0, 1, 2], rerank
        assert (pages[0, 0] >= 0).sum() == 10 and {0, 18, 19} <= set(pages[0, 0].tolist())


def test_rerank_never_reads_keys_past_a_rows_length():
    """The short row of a batch has fewer candidates than ``rerank`` asks for: the entries past its real
    candidates point at pages past its length, whose keys (NaN, Inf here) must not change its choice."""
    from sparse_attn.patterns import KineticsSelect

    gen = torch.Generator().manual_seed(7)
    k = torch.randn(2, 2, 640, 16, generator=gen)
    seq = torch.tensor([640, 400])  # 40 and 25 pages; 17 chosen by score of 37 and 22 candidates
    q = torch.randn(2, 4, 1, 16, generator=gen)
    pat = KineticsSelect(k=20, sink=16, window=16, rerank=3.0)
    want = pat.select(q, PageSummaries.from_cache(k, seq, page_size=P), seq, k_cache=k)
    poisoned = k.clone()
    poisoned[1, :, 400:] = float("nan")
    poisoned[1, 1, 500] = float("inf")
    got = pat.select(q, PageSummaries.from_cache(poisoned, seq, page_size=P), seq, k_cache=poisoned)
    assert torch.equal(got, want)
    assert (got >= 0).sum(-1).tolist() == [[20, 20], [20, 20]] and int(got[1].max()) == 24


@pytest.mark.parametrize("rerank", [1.0, 3.0])
def test_a_row_with_a_smaller_budget_keeps_its_best_pages_up_to_its_budget(rerank):
    """Rows of one batch with different budgets: each keeps exactly its own number of pages, the best ones."""
    from sparse_attn.patterns import KineticsSelect

    gen = torch.Generator().manual_seed(8)
    k = torch.randn(2, 2, 640, 16, generator=gen)
    seq = torch.tensor([640, 200])  # 40 pages (budget 20) and 13 pages (budget 13: every page)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    s = PageSummaries.from_cache(k, seq, page_size=P)
    got = KineticsSelect(k=20, sink=16, window=16, rerank=rerank).select(q, s, seq, k_cache=k)
    assert (got >= 0).sum(-1).tolist() == [[20, 20], [13, 13]]
    assert got[1, :, :13].tolist() == [list(range(13))] * 2
    short = KineticsSelect(k=8, sink=16, window=16, rerank=rerank).select(q, s, seq, k_cache=k)
    # the short row with a budget of 8 of 13 pages alone: the same choice as inside the batch
    alone = KineticsSelect(k=8, sink=16, window=16, rerank=rerank).select(
        q[1:], PageSummaries.from_cache(k[1:, :, :200], seq[1:], page_size=P), seq[1:], k_cache=k[1:, :, :200])
    assert torch.equal(short[1:, :, :alone.shape[-1]], alone)


def test_sketch_dtype_defaults_to_bf16_where_matmuls_have_it_and_refuses_others():
    from sparse_attn.kvcache import default_sketch_dtype

    k = torch.randn(1, 2, 64, 16)
    s = PageSummaries.from_cache(k, torch.tensor([64]), page_size=P, rank=4)
    assert s.sketch.proj.dtype == default_sketch_dtype(k.device) in (torch.bfloat16, torch.float32)
    assert default_sketch_dtype("cuda") == torch.bfloat16
    with pytest.raises(TypeError, match="sketch_dtype must be torch.bfloat16 or torch.float32, got torch.float16"):
        PageSummaries.from_cache(k, torch.tensor([64]), page_size=P, rank=4, sketch_dtype=torch.float16)


def test_a_bf16_sketch_keeps_almost_the_keys_of_a_float32_one():
    """Rounding the projections to bf16 moves only keys near the budget's edge (real quality: docs/decode.md)."""
    gen = torch.Generator().manual_seed(8)
    k = torch.randn(1, 4, 8192, 64, generator=gen)
    k[0, :, torch.randint(0, 8192, (64,), generator=gen)] *= 3  # some keys that matter
    q, seq = torch.randn(1, 8, 1, 64, generator=gen), torch.tensor([8192])
    pat = LokiSelect(k=0.125, rank=16)
    lists = [pat.select(q, PageSummaries.from_cache(k, seq, page_size=P, rank=16, sketch_dtype=dt), seq)
             for dt in (torch.float32, torch.bfloat16)]
    assert lists[0].shape == lists[1].shape == (1, 4, 1024)
    same = [len(set(a.tolist()) & set(b.tolist())) / 1024 for a, b in zip(lists[0][0], lists[1][0])]
    assert min(same) >= 0.95, same


def _logits(q, k, qmap, kmap):
    """Sketch logits ``(q @ qmap) . (k @ kmap)`` per kv head: q ``[Hkv, N, D]``, k ``[Hkv, M, D]`` ->
    ``[Hkv, N, M]``."""
    return (q @ qmap) @ (k @ kmap).transpose(1, 2)


def test_query_aware_maps_are_exact_at_full_rank_reduce_to_the_key_basis_and_fall_back_on_bad_moments():
    from sparse_attn.kvcache import fit_sketch_maps

    gen = torch.Generator().manual_seed(10)
    dim = 16
    k = torch.randn(1, 3, 200, dim, generator=gen) * torch.linspace(0.3, 3.0, dim)
    valid = torch.ones(1, 200, dtype=torch.bool)
    a = torch.randn(3, dim, dim, generator=gen)
    moment = a @ a.transpose(1, 2) / dim  # a full-rank query second moment per kv head
    q = torch.randn(3, 50, dim, generator=gen)
    kmap, qmap = fit_sketch_maps(k, valid, dim, moment)
    torch.testing.assert_close(_logits(q, k[0], qmap, kmap), q @ k[0].transpose(1, 2), atol=2e-3, rtol=1e-4)
    basis = fit_key_basis(k, valid, 4)
    kmap, qmap = fit_sketch_maps(k, valid, 4, torch.eye(dim).expand(3, dim, dim) * 2.5)  # isotropic queries
    torch.testing.assert_close(_logits(q, k[0], qmap, kmap), _logits(q, k[0], basis, basis), atol=1e-3, rtol=1e-3)
    assert fit_sketch_maps(k, valid, 4)[1] is None  # no moment: the keys' basis for both
    bad = moment.clone()
    bad[0, 1, 1] = float("nan")
    bad[1] = 0.0  # no query seen
    kmap, qmap = fit_sketch_maps(k, valid, 4, bad)
    for h in (0, 1):
        torch.testing.assert_close(_logits(q[h:h + 1], k[0, h:h + 1], qmap[h:h + 1], kmap[h:h + 1]),
                                   _logits(q[h:h + 1], k[0, h:h + 1], basis[h:h + 1], basis[h:h + 1]), atol=1e-3,
                                   rtol=1e-3)
    assert bool(torch.isfinite(kmap).all() and torch.isfinite(qmap).all())


def test_query_aware_sketch_spends_its_rank_where_the_queries_look():
    """Keys with most energy in channels the queries never probe: the keys' own basis spends its rank there,
    the query-aware maps do not, and their logits are far closer to the exact ones."""
    from sparse_attn.kvcache import fit_sketch_maps

    gen = torch.Generator().manual_seed(11)
    dim, rank = 8, 2
    k = torch.randn(1, 1, 400, dim, generator=gen) * torch.tensor([10.0, 8.0, 3, 2.5, 1, 1, 1, 1])
    q = torch.randn(1, 300, dim, generator=gen) * torch.tensor([0.0, 0.0, 1, 1, 1, 1, 1, 1])  # never channels 0, 1
    valid = torch.ones(1, 400, dtype=torch.bool)
    moment = (q.transpose(1, 2) @ q) / q.shape[1]
    exact = q @ k[0].transpose(1, 2)
    basis = fit_key_basis(k, valid, rank)
    kmap, qmap = fit_sketch_maps(k, valid, rank, moment)
    err_keys = (_logits(q, k[0], basis, basis) - exact).square().mean()
    err_aware = (_logits(q, k[0], qmap, kmap) - exact).square().mean()
    assert err_aware < 0.5 * err_keys, (float(err_aware), float(err_keys))


def test_decode_state_fits_the_sketch_to_the_observed_queries():
    from sparse_attn.decode import DecodeState

    gen = torch.Generator().manual_seed(12)
    k = torch.randn(1, 2, 300, 16, generator=gen)
    q1, q2 = torch.randn(1, 6, 40, 16, generator=gen), torch.randn(1, 6, 10, 16, generator=gen)
    state = DecodeState()
    state.observe_queries(0, q1, 2)
    rows1 = q1.double().reshape(2, -1, 16)
    torch.testing.assert_close(state.query_moment(0), rows1.transpose(1, 2) @ rows1 / 120, rtol=1e-5, atol=1e-6)
    state.observe_queries(0, q2, 2, fresh=False)  # a later chunk adds its rows
    rows = torch.cat([rows1, q2.double().reshape(2, -1, 16)], 1)
    torch.testing.assert_close(state.query_moment(0), rows.transpose(1, 2) @ rows / 150, rtol=1e-5, atol=1e-6)
    seq = torch.tensor([300])
    s = state.summaries(0, k, seq, P, rank=4)
    assert s.sketch.query_map is not None and state.summaries(1, k, seq, P, rank=4).sketch.query_map is None
    want = PageSummaries.from_cache(k, seq, page_size=P, rank=4, query_moment=state.query_moment(0))
    torch.testing.assert_close(s.sketch.proj, want.sketch.proj)
    state.reset(0)  # a prefill forgets the summaries, not the queries it is about to add to
    assert state.query_moment(0) is not None
    state.observe_queries(0, q2, 2)  # a new sequence starts over
    rows2 = q2.double().reshape(2, -1, 16)
    torch.testing.assert_close(state.query_moment(0), rows2.transpose(1, 2) @ rows2 / 30, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"query_moment must be a tensor \[Hkv=2, D=16, D=16\], got \[2, 8, 8\]"):
        PageSummaries.from_cache(k, seq, page_size=P, rank=4, query_moment=torch.eye(8).expand(2, 8, 8))


def test_summaries_without_page_statistics_select_alike_and_refuse_page_scores():
    """``stats=False`` (loki reads the sketch only): no mean / min / max memory, the same lists for every loki
    granularity, kept up to date through appends (contiguous and paged), and a clear error for kinetics / quest."""
    from sparse_attn.patterns import KineticsSelect, QuestSelect

    gen = torch.Generator().manual_seed(14)
    k = torch.randn(2, 2, 300, 16, generator=gen)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    seq = torch.tensor([250, 180])
    full = PageSummaries.from_cache(k, seq, page_size=P, rank=4)
    bare = PageSummaries.from_cache(k, seq, page_size=P, rank=4, stats=False)
    assert full.has_stats and not bare.has_stats and bare.mean.numel() == bare.kmin.numel() == 0
    for _ in range(3):  # appends: both kept up to date the same way
        full.update(k, seq, seq + 7)
        bare.update(k, seq, seq + 7)
        seq = seq + 7
    torch.testing.assert_close(bare.sketch.proj, full.sketch.proj)
    for g in ("token", "page", 4):
        pat = LokiSelect(k=0.25, granularity=g)
        assert torch.equal(pat.select(q, bare, seq), pat.select(q, full, seq)), g
    kc, table = _paged(k, seq, 50, gen)
    bare_paged = PageSummaries.from_cache(kc, seq, block_table=table, rank=4, stats=False)
    pat = LokiSelect(k=0.25, granularity="page")
    assert torch.equal(pat.select(q, bare_paged, seq, block_table=table),
                       pat.select(q, PageSummaries.from_cache(kc, seq, block_table=table, rank=4), seq,
                                  block_table=table))
    assert bare.grow(40).mean.shape == (2, 2, 40, 0)
    for sel in (KineticsSelect(k=2), QuestSelect(k=2)):
        with pytest.raises(ValueError, match="no page statistics .* stats=True for kinetics / quest"):
            sel.select(q, bare, seq)
    assert not LokiSelect.page_stats and KineticsSelect.page_stats
    with pytest.raises(ValueError, match="stats=False keeps neither"):
        PageSummaries.from_cache(k, seq, page_size=P, stats=False)
    with pytest.raises(TypeError, match="stats must be a bool"):
        PageSummaries.from_cache(k, seq, page_size=P, rank=4, stats="no")
