"""DHSA: variable-length key chunks, token budgets, token-exact lowering (CPU, small shapes)."""

import math

import pytest
import torch

from sparse_attn import get_pattern, pattern_from_json, sparse_attention
from sparse_attn.patterns.dhsa import DHSA, similarity_starts
from sparse_attn.patterns.synthetic import planted_qkv


def _qkv(lq, lk, hq=2, hkv=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, hkv, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, hkv, lk, d, generator=gen, dtype=torch.float64)
    return q, k, v


# ---- configuration -------------------------------------------------------------------------------------------
def test_json_round_trip_and_registry():
    for pat in (DHSA(), DHSA(budget=1024, boundary="fixed", chunk_size=96, per_head=False, block_q=128,
                             block_size=(64, 32), threshold=-0.25)):
        again = pattern_from_json(pat.to_json())
        assert again == pat and type(again) is DHSA and again.to_json() == pat.to_json()
    assert get_pattern("dhsa", budget=0.2) == DHSA(budget=0.2)
    assert DHSA.token_exact


@pytest.mark.parametrize("kw, exc, match", [
    (dict(budget=-1), ValueError, "budget must be >= 0"),
    (dict(budget=1.5), ValueError, "budget as a float"),
    (dict(budget="all"), TypeError, "budget"),
    (dict(budget=(8, 16)), TypeError, "budget must be an int or a float"),
    (dict(local=-2), ValueError, "local must be >= 0"),
    (dict(local=1.0), TypeError, "local must be an int"),
    (dict(sink=-1), ValueError, "sink must be >= 0"),
    (dict(boundary="learned"), ValueError, "boundary must be one of"),
    (dict(threshold=2.0), ValueError, "threshold must be a float in \\[-1, 1\\], got 2.0"),
    (dict(threshold="0.5"), TypeError, "threshold"),
    (dict(min_chunk=0), ValueError, "min_chunk must be >= 1"),
    (dict(min_chunk=64, max_chunk=100), ValueError, "max_chunk must be >= 2 \\* min_chunk = 128, got 100"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(block_q=96), ValueError, "block_q must be a multiple of BLOCK_M=64, got 96"),
    (dict(per_head=1), TypeError, "per_head must be a bool"),
])
def test_bad_parameters(kw, exc, match):
    with pytest.raises(exc, match=match):
        DHSA(**kw)


# ---- chunk boundaries --------------------------------------------------------------------------------------------
def _planted_starts(seq_len, head_dim, seed=0, topics=64):
    """The segment starts of head 0 of ``planted_qkv("clusters", ...)`` where the topic changes (the generator's
    draws replayed: topics, then segment lengths, then segment topics)."""
    gen = torch.Generator().manual_seed(seed)
    torch.randn(topics, head_dim - 1, generator=gen)
    lengths, total = [], 0
    while total < seq_len:
        n = int(torch.randint(128, 513, (1,), generator=gen))
        lengths.append(min(n, seq_len - total))
        total += lengths[-1]
    seg_topic = torch.randint(0, topics, (len(lengths),), generator=gen)
    first = [0] + list(torch.tensor(lengths).cumsum(0)[:-1].tolist())
    return {f for i, f in enumerate(first) if i == 0 or seg_topic[i] != seg_topic[i - 1]}


def test_similarity_boundaries_find_planted_segments():
    inp = planted_qkv("clusters", 2048, heads=1, head_dim=32)
    truth = _planted_starts(2048, 32)
    assert len(truth) >= 5
    found = set(similarity_starts(inp.k, 0.5, 32)[0, 0].nonzero().flatten().tolist())
    assert found == truth
    ids = DHSA(max_chunk=256).chunk_ids(inp.k)[0, 0]  # runs cut to <= 256 keys, each >= 32
    starts = set((torch.diff(ids, prepend=ids[:1] - 1) > 0).nonzero().flatten().tolist())
    assert truth <= starts
    sizes = torch.bincount(ids)
    assert int(sizes.max()) <= 256 and int(sizes.min()) >= 32
    fixed = DHSA(boundary="fixed", chunk_size=100).chunk_ids(inp.k)
    assert fixed.shape == (1, 1, 2048) and int(fixed.max()) == 20


def test_min_chunk_spacing_on_noise():
    _, k, _ = _qkv(4, 300, d=4)
    starts = similarity_starts(k, 0.3, 7)  # random 4-d keys: many candidates
    for row in starts.reshape(-1, 300):
        pos = row.nonzero().flatten()
        assert pos[0] == 0 and bool((torch.diff(pos) >= 7).all()) and (300 - int(pos[-1])) >= 7


# ---- the selection against a plain-Python reference -----------------------------------------------------------
def _ref_chunks(k_head_list, lk, pat):
    """Chunk id per key (Python lists) for the pattern's boundary rule; ``k_head_list``: keys ``[Lk, D]`` per head."""
    if pat.boundary == "fixed":
        return [[j // pat.chunk_size for j in range(lk)]]
    sims = []
    for kh in k_head_list:
        kn = kh / kh.norm(dim=-1, keepdim=True)
        sims.append([float(kn[j] @ kn[j - 1]) for j in range(1, lk)])
    if not pat.per_head:
        sims = [[sum(s[i] for s in sims) / len(sims) for i in range(lk - 1)]]
    out = []
    for sim in sims:
        mc = pat.min_chunk
        cand = [j for j in range(1, lk) if sim[j - 1] < pat.threshold and mc <= j <= lk - mc]
        key = lambda j: (sim[j - 1], j)  # noqa: E731  stronger = smaller
        starts = [0] + [j for j in cand if all(key(j) < key(o) for o in cand if o != j and abs(o - j) < mc)]
        ids, c = [], 0
        bounds = starts + [lk]
        for a, b in zip(bounds[:-1], bounds[1:]):
            n = b - a
            m = math.ceil(n / pat.max_chunk)
            pieces = [o * m // n for o in range(n)]
            ids += [c + p for p in pieces]
            c += pieces[-1] + 1
        out.append(ids)
    return out


def _ref_token_sets(q, k, pat, causal):
    """``{(head, query block): set of kept keys}`` by plain loops (float64 inputs)."""
    _, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    grp = hq // hkv
    chunk_lists = _ref_chunks([k[0, h] for h in range(hkv)], lk, pat)
    n_q = math.ceil(lq / pat.block_q)
    scores = {}  # (query head, block) -> {chunk: score}
    for h in range(hq):
        ids = chunk_lists[min(h // grp, len(chunk_lists) - 1)]
        for qb in range(n_q):
            rows = q[0, h, qb * pat.block_q: min(lq, (qb + 1) * pat.block_q)]
            qrep = rows.mean(0) * math.sqrt(rows.shape[0])
            sc = {}
            for c in sorted(set(ids)):
                keys = k[0, h // grp, [j for j in range(lk) if ids[j] == c]]
                sc[c] = float(qrep @ (keys.mean(0) * math.sqrt(keys.shape[0])))
            scores[h, qb] = sc
    heads = range(hq) if pat.per_head else [0]
    out = {}
    for h in heads:
        ids = chunk_lists[min(h // grp, len(chunk_lists) - 1)]
        for qb in range(n_q):
            sc = scores[h, qb] if pat.per_head else {c: sum(scores[x, qb][c] for x in range(hq)) / hq
                                                     for c in scores[0, qb]}
            q_last = min(lq, (qb + 1) * pat.block_q) - 1
            hi = min(q_last + lk - lq, lk - 1)
            hi = max(hi, -1) if causal else max(hi, 0)
            seen = list(range(hi + 1)) if causal else list(range(lk))
            lo = min(qb * pat.block_q + lk - lq, hi) - pat.local + 1
            local = {j for j in seen if pat.local and lo <= j <= hi} | {j for j in seen if j < pat.sink}
            total = math.ceil(pat.budget * len(seen) - 1e-9) if isinstance(pat.budget, float) else pat.budget
            left = max(0, min(total, len(seen)) - len(local))
            keep = set(local)
            order = sorted({ids[j] for j in seen if j not in local}, key=lambda c: (-sc[c], c))
            for c in order:
                for j in sorted((j for j in seen if j not in local and ids[j] == c), reverse=True):
                    if left > 0:
                        keep.add(j)
                        left -= 1
            out[h, qb] = keep
    return out


@pytest.mark.parametrize("lq, lk, causal, kw", [
    pytest.param(72, 72, False, dict(budget=24), id="noncausal-int"),
    pytest.param(72, 72, True, dict(budget=0.3), id="causal-frac"),
    pytest.param(40, 90, True, dict(budget=30, per_head=False), id="causal-shift-headavg"),
    pytest.param(56, 40, False, dict(budget=0.5, boundary="fixed", chunk_size=6), id="fixed-longq"),
    pytest.param(64, 64, True, dict(budget=20, block_q=32), id="blockq2"),
    pytest.param(64, 80, True, dict(budget=0.4, block_q=32, sink=5), id="sink"),
    pytest.param(70, 50, False, dict(budget=0.4, sink=3, local=0), id="sink-nolocal"),
])
def test_selection_matches_reference(lq, lk, causal, kw):
    pat = DHSA(**{**dict(local=6, threshold=0.1, min_chunk=3, max_chunk=9, block_q=16, block_size=16), **kw})
    q, k, _ = _qkv(lq, lk, hq=4, hkv=2)
    got = pat.token_map(q, k, causal=causal)  # [1, Hm, NQ, Lk]
    ref = _ref_token_sets(q, k, pat, causal)
    assert got.shape[1] == (4 if pat.per_head else 1)
    for (h, qb), keys in ref.items():
        assert set(got[0, h, qb].nonzero().flatten().tolist()) == keys, (h, qb)


# ---- the mask through sparse_attention ------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_mask_runs_and_matches_restricted_softmax(causal):
    pat = DHSA(budget=40, local=8, threshold=0.1, min_chunk=3, max_chunk=12, block_q=32, block_size=16)
    q, k, v = (x.float() for x in _qkv(80, 96, hq=4, hkv=2, d=16, seed=1))
    mask = pat.build(q, k, causal=causal)
    mask.validate()
    assert mask.bit_words is not None  # chunk edges cross tiles: bit masks
    allowed = pat.token_map(q, k, causal=causal).repeat_interleave(32, 2)[:, :, :80]  # [1, 4, Lq, Lk]
    if causal:
        allowed = allowed & torch.ones(80, 96, dtype=torch.bool).tril(96 - 80)
    assert torch.equal(mask.to_dense().expand_as(allowed), allowed)
    out = sparse_attention(q, k, v, mask, causal=causal, backend="torch")
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2)) / math.sqrt(16)
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
    torch.testing.assert_close(out, p @ vv, atol=2e-5, rtol=2e-5)
    assert torch.equal(pat.block_map(q, k, causal=causal), mask.to_block_dense().expand(1, 4, -1, -1))


def test_preset_builds():
    from sparse_attn.integrations.presets import PRESETS, get_preset

    cfg = get_preset("dhsa")
    pat = cfg.pattern
    assert isinstance(pat, DHSA) and pat.budget == 1024 and pat.local == 64 and pat.block_q == 128 and pat.sink == 64
    assert not pat.per_head and pat.boundary == "similarity"
    assert "dhsa" in PRESETS and PRESETS["dhsa"].differs
    q, k, _ = _qkv(256, 256, hq=2, hkv=1, d=16)
    mask = pat.build(q.float(), k.float(), causal=True)
    assert mask.batch_heads == (1, 1) and 0 < mask.density() <= 1
