"""Token-granular selection (``LokiSelect(granularity="token")``): the best keys themselves, not their pages."""

import pytest
import torch

from sparse_attn import sparse_attention_with_kvcache
from sparse_attn.kvcache import PageSummaries
from sparse_attn.patterns import LokiSelect
from sparse_attn_kernels.reference_decode import decode_fwd_ref

P = 16


def _problem(seed, batch=2, hkv=2, group=3, length=300, dim=16):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, hkv, length, dim, generator=gen)
    v = torch.randn(batch, hkv, length, dim, generator=gen)
    q = torch.randn(batch, hkv * group, 1, dim, generator=gen) * 2
    return q, k, v


def test_full_rank_token_selection_keeps_the_keys_of_largest_exact_share_plus_sinks_and_window():
    q, k, _ = _problem(0)
    hkv, dim = k.shape[1], k.shape[-1]
    seq = torch.tensor([300, 233])
    s = PageSummaries.from_cache(k, seq, page_size=P, rank=dim, sketch_dtype=torch.float32)
    pat = LokiSelect(k=5, sink=3, window=10, rank=dim, granularity="token")
    got = pat.select(q, s, seq)
    assert pat.unit(P) == 1 and LokiSelect().unit(P) == 1 and LokiSelect(granularity="page").unit(P) == P
    for b, n in enumerate(seq.tolist()):
        logits = q[b, :, 0].view(hkv, -1, dim) @ k[b, :, :n].transpose(-1, -2) * dim ** -0.5  # [Hkv, G, n]
        share = torch.softmax(logits.double(), -1).sum(1)  # [Hkv, n]
        forced = torch.zeros(n, dtype=torch.bool)
        forced[:3] = True
        forced[n - 1 - 10:] = True  # the window before the query's own key, and that key
        budget = 5 * P  # five pages' worth of keys, forced ones included
        best = share.masked_fill(forced, float("-inf")).topk(budget - int(forced.sum()), -1).indices
        want = torch.zeros(hkv, n, dtype=torch.bool).scatter_(-1, best, True) | forced
        for h in range(hkv):
            row = got[b, h]
            assert torch.equal(row[row >= 0].long(), want[h].nonzero().squeeze(1)), (b, h)
            assert bool((row[int((row >= 0).sum()):] == -1).all())


def test_token_lists_attend_exactly_those_keys_and_poisoned_others_never_reach_the_output():
    q, k, v = _problem(1)
    seq = torch.tensor([300, 170])
    pat = LokiSelect(k=0.25, sink=4, window=8, rank=4, granularity="token")
    toks = pat.select(q, PageSummaries.from_cache(k, seq, page_size=P, rank=4), seq)
    counts = (toks >= 0).sum(-1).int()
    assert counts.tolist() == [[80, 80], [48, 48]]  # ceil(pages / 4) pages of keys: 5 and 3 pages
    kept = torch.zeros(2, 2, 300, dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            kept[b, h, toks[b, h, : counts[b, h]].long()] = True
    kp, vp = k.clone(), v.clone()
    kp[~kept] = float("nan")  # every key the list leaves out (and every key past a length)
    vp[~kept] = float("inf")
    o = sparse_attention_with_kvcache(q, kp, vp, seq, pages=toks, page_size=pat.unit(P))
    ref, _ = decode_fwd_ref(q.double(), k.double(), v.double(), seq, counts, toks, None, True, 16 ** -0.5, 1)
    assert bool(torch.isfinite(o).all())
    torch.testing.assert_close(o.double(), ref, atol=1e-5, rtol=0)


def test_every_key_selected_is_dense_decode():
    q, k, v = _problem(2, length=130)
    seq = torch.tensor([130, 97])
    pat = LokiSelect(k=1.0, rank=4, granularity="token")
    toks = pat.select(q, PageSummaries.from_cache(k, seq, page_size=P, rank=4), seq)
    assert (toks >= 0).sum(-1).tolist() == [[130, 130], [97, 97]]
    got = sparse_attention_with_kvcache(q, k, v, seq, pages=toks, page_size=1)
    dense = sparse_attention_with_kvcache(q, k, v, seq, page_size=P)
    torch.testing.assert_close(got, dense, atol=1e-6, rtol=1e-6)


def test_several_queries_see_their_own_keys_bottom_right_causal():
    q, k, v = _problem(3, length=200)
    q = torch.randn(2, 6, 4, 16, generator=torch.Generator().manual_seed(9))
    seq = torch.tensor([200, 150])
    pat = LokiSelect(k=0.2, sink=0, window=0, rank=4, granularity="token")
    toks = pat.select(q, PageSummaries.from_cache(k, seq, page_size=P, rank=4), seq)
    for b, n in enumerate(seq.tolist()):
        assert set(range(n - 4, n)) <= set(toks[b, 0].tolist())  # the queries' own keys are forced
    counts = (toks >= 0).sum(-1).int()
    o = sparse_attention_with_kvcache(q, k, v, seq, pages=toks, page_size=1)
    ref, _ = decode_fwd_ref(q.double(), k.double(), v.double(), seq, counts, toks, None, True, 16 ** -0.5, 1)
    torch.testing.assert_close(o.double(), ref, atol=1e-5, rtol=0)


def test_units_of_a_few_keys_keep_the_units_of_largest_share_and_attend_them_exactly():
    q, k, v = _problem(4)
    hkv, dim = k.shape[1], k.shape[-1]
    seq = torch.tensor([300, 201])
    s = PageSummaries.from_cache(k, seq, page_size=P, rank=dim, sketch_dtype=torch.float32)
    pat = LokiSelect(k=4, sink=8, window=8, rank=dim, granularity=4)
    assert pat.unit(P) == 4
    units = pat.select(q, s, seq)
    for b, n in enumerate(seq.tolist()):
        logits = q[b, :, 0].view(hkv, -1, dim) @ k[b, :, :n].transpose(-1, -2) * dim ** -0.5
        share = torch.softmax(logits.double(), -1).sum(1)  # [Hkv, n]
        n_units = -(-n // 4)
        per_unit = torch.nn.functional.pad(share, (0, n_units * 4 - n)).view(hkv, n_units, 4).sum(-1)
        forced = torch.zeros(n_units, dtype=torch.bool)
        forced[:2] = True  # the 8 sink keys
        forced[(n - 1 - 8) // 4:] = True  # the window before the query's own key, and that key's unit
        best = per_unit.masked_fill(forced, float("-inf")).topk(4 * P // 4 - int(forced.sum()), -1).indices
        want = torch.zeros(hkv, n_units, dtype=torch.bool).scatter_(-1, best, True) | forced
        for h in range(hkv):
            row = units[b, h]
            assert torch.equal(row[row >= 0].long(), want[h].nonzero().squeeze(1)), (b, h)
    counts = (units >= 0).sum(-1).int()
    o = sparse_attention_with_kvcache(q, k, v, seq, pages=units, page_size=4)
    ref, _ = decode_fwd_ref(q.double(), k.double(), v.double(), seq, counts, units, None, True, dim ** -0.5, 4)
    torch.testing.assert_close(o.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("granularity", ["tokens", 0, -4, True, 2.0])
def test_bad_granularities_name_the_argument(granularity):
    with pytest.raises(ValueError, match="granularity must be one of"):
        LokiSelect(granularity=granularity)


def test_bad_granularity_rerank_and_paged_caches_name_the_problem():
    s = PageSummaries.from_cache(torch.randn(1, 1, 40, 8), torch.tensor([40]), page_size=P, rank=2)
    with pytest.raises(ValueError, match="must divide the page size 16"):
        LokiSelect(k=1, rank=2, granularity=6).select(torch.randn(1, 2, 1, 8), s, torch.tensor([40]))
    with pytest.raises(ValueError, match="takes no rerank"):
        LokiSelect(granularity="token", rerank=2.0)
    k = torch.randn(4, P, 1, 8)  # a paged cache of 4 pages
    table = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    s = PageSummaries.from_cache(k, torch.tensor([40]), block_table=table, rank=2)
    with pytest.raises(ValueError, match="contiguous cache"):
        LokiSelect(k=1, rank=2, granularity="token").select(torch.randn(1, 2, 1, 8), s, torch.tensor([40]),
                                                            block_table=table)


def test_per_head_budgets_keep_each_heads_best_keys_up_to_its_budget():
    q, k, _ = _problem(5)
    dim = k.shape[-1]
    seq = torch.tensor([300, 160])
    s = PageSummaries.from_cache(k, seq, page_size=P, rank=dim, sketch_dtype=torch.float32)
    both = LokiSelect(k=(0.25, 0.5), sink=0, window=0, rank=dim).select(q, s, seq)
    for h, frac in enumerate((0.25, 0.5)):
        alone = LokiSelect(k=frac, sink=0, window=0, rank=dim).select(q, s, seq)
        for b in range(2):
            want = alone[b, h][alone[b, h] >= 0]
            got = both[b, h][both[b, h] >= 0]
            assert torch.equal(got, want), (b, h)
    assert ((both >= 0).sum(-1)).tolist() == [[80, 160], [48, 80]]


def test_token_lists_equal_the_mask_path_and_never_choose_a_nan_score():
    """The position-built lists (the fast path) against forced mask + best-scored keys (``_keep_best``)."""
    from sparse_attn.patterns.decode import _keep_best, _token_lists, pages_from_keep

    gen = torch.Generator().manual_seed(6)
    scores = torch.rand(2, 3, 200, generator=gen)  # distinct values: no ties
    scores[0, 1, 50:60] = float("nan")
    seq, q_len, sink, window = torch.tensor([200, 131]), 2, 8, 16
    budget = torch.tensor([[40, 60, 25], [30, 30, 30]])
    sel = LokiSelect(sink=sink, window=window)
    forced = sel.forced(200, seq, q_len, 1)[:, None, :]
    valid = torch.arange(200)[None, :] < seq[:, None]
    want = pages_from_keep(_keep_best(scores, valid, forced, budget))
    got = _token_lists(scores, seq, q_len, sink, window, budget)
    assert torch.equal(got, want)
    assert not set(range(50, 60)) & set(got[0, 1].tolist())
    small = torch.full((2, 3), 5)  # fewer keys than the forced ones: those only, nothing chosen by score
    want = pages_from_keep(_keep_best(scores, valid, forced, small))
    assert torch.equal(_token_lists(scores, seq, q_len, sink, window, small), want)
    assert want.shape[-1] == sink + window + q_len


def test_lists_every_row_sees_take_the_short_path_with_the_same_results_and_nan_semantics():
    """Full lists below every length with one query (the CPU path's mask-free softmax) against the same keys
    with a padded list (the general path) and the fp64 oracle; poisoned unlisted keys never matter; a listed
    non-finite key makes its group's rows NaN, never a silent number."""
    q, k, v = _problem(13, batch=2, hkv=2, group=2, length=200)
    seq = torch.tensor([200, 150])
    gen = torch.Generator().manual_seed(13)
    toks = torch.stack([torch.stack([torch.randperm(int(n), generator=gen)[:40].sort().values for _ in range(2)])
                        for n in seq.tolist()]).int()  # [B, Hkv, 40], every entry used and < the row's length
    listed = torch.zeros(2, 2, 200, dtype=torch.bool).scatter_(-1, toks.long(), True)
    k = k.masked_fill(~listed[..., None], float("nan"))  # keys outside the lists poisoned
    v = v.masked_fill(~listed[..., None], float("inf"))
    padded = torch.cat([toks, torch.full((2, 2, 1), -1, dtype=torch.int32)], -1)  # the general path
    short = sparse_attention_with_kvcache(q, k, v, seq, pages=toks, page_size=1, return_lse=True)
    general = sparse_attention_with_kvcache(q, k, v, seq, pages=padded, page_size=1, return_lse=True)
    ref, ref_lse = decode_fwd_ref(q.double(), k.double(), v.double(), seq.int(), torch.full((2, 2), 40).int(), toks,
                                  None, True, 0.25, 1)
    for o, lse in (short, general):
        assert bool(torch.isfinite(o).all())
        torch.testing.assert_close(o.double(), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=0)
    for cache, value in ((v, float("nan")), (k, float("inf"))):
        bad = cache.clone()
        bad[1, 0, int(toks[1, 0, 7])] = value
        o = sparse_attention_with_kvcache(q, bad if cache is k else k, bad if cache is v else v, seq, pages=toks,
                                          page_size=1)
        assert bool(torch.isnan(o[1, :2]).all()) and bool(torch.isfinite(o[0]).all() and torch.isfinite(o[1, 2:]).all())
