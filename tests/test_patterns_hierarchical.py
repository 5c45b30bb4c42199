"""Hierarchical chunk selection against dense Python-loop references (small inputs, random => no ties)."""

import math

import pytest
import torch

from sparse_attn.patterns import ChunkSelect, get_pattern, pattern_from_json


def _ref_chunks(q, k, bm, chunk, causal, rule, kk, tau, length_norm=True):
    """Loop over batch, head, query block: chunk scores in fp64, own chunk, top-k / VMoBA threshold."""
    b, hq, lq, _ = q.shape
    lk, group = k.shape[2], hq // k.shape[1]
    n_qb, n_c = math.ceil(lq / bm), math.ceil(lk / chunk)
    out = torch.zeros(b, hq, n_qb, n_c, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            kc = []
            for c in range(n_c):
                seg = k[bi, h // group, c * chunk:(c + 1) * chunk].double()
                kc.append(seg.mean(0) * (math.sqrt(seg.shape[0]) if length_norm else 1.0))
            kc = torch.stack(kc)
            for m in range(n_qb):
                q0, q1 = m * bm, min(lq, (m + 1) * bm) - 1
                g = kc @ q[bi, h, q0:q1 + 1].double().mean(0)
                lo, hi = max(0, q0 + lk - lq), min(lk - 1, q1 + lk - lq)
                own = [c for c in range(n_c) if hi >= 0 and c * chunk <= hi and min(lk, (c + 1) * chunk) - 1 >= lo]
                cand = [c for c in range(n_c) if c not in own and (not causal or c * chunk <= q1 + lk - lq)]
                keep = set(own)
                if cand and rule == "topk":
                    keep |= set(sorted(cand, key=lambda c: -g[c].item())[:kk])
                elif cand:
                    gc = g[cand]
                    norm = (gc - gc.min()) / max((gc.max() - gc.min()).item(), 1e-12)
                    order = torch.argsort(norm, descending=True)
                    acc, total = 0.0, norm.sum().item()
                    for n, i in enumerate(order.tolist()):
                        if n > 0 and acc >= tau * total:
                            break
                        keep.add(cand[i])
                        acc += norm[i].item()
                out[bi, h, m, sorted(keep)] = True
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rule,lq,lk", [("topk", 200, 200), ("topk", 96, 224), ("threshold", 200, 200),
                                        ("threshold", 160, 224)])
def test_chunk_map_matches_reference(causal, rule, lq, lk):
    gen = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(2, 4, lq, 16, generator=gen)
    k = torch.randn(2, 2, lk, 16, generator=gen)
    pat = ChunkSelect(chunk_size=32, rule=rule, k=2, tau=0.4, block_size=16)
    got = pat.chunk_map(q, k, causal=causal)
    assert torch.equal(got, _ref_chunks(q, k, 16, 32, causal, rule, 2, 0.4))


@pytest.mark.parametrize("causal", [False, True])
def test_block_map_expands_chunks(causal):
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 2, 130, 16, generator=gen), torch.randn(1, 2, 130, 16, generator=gen)
    pat = ChunkSelect(chunk_size=64, k=1, block_size=32)
    chunks = pat.chunk_map(q, k, causal=causal)
    blocks = pat.block_map(q, k, causal=causal)
    n_kb = math.ceil(130 / 32)
    ref = chunks[..., torch.arange(n_kb) * 32 // 64]
    if causal:
        q_last = torch.clamp((torch.arange(5) + 1) * 32, max=130) - 1
        ref = ref & ((torch.arange(n_kb) * 32)[None, :] <= q_last[:, None])
    assert torch.equal(blocks, ref)
    mask = pat.build(q, k, causal=causal)
    assert mask.batch_heads == (1, 2)


def test_config_round_trip_and_errors():
    pat = get_pattern("chunk_select", chunk_size=128, rule="threshold", tau=0.3)
    assert pattern_from_json(pat.to_json()) == pat
    with pytest.raises(ValueError, match="chunk_size must be a multiple"):
        ChunkSelect(chunk_size=100, block_size=64)
    with pytest.raises(ValueError, match="rule"):
        ChunkSelect(rule="top")
    with pytest.raises(ValueError, match="tau"):
        ChunkSelect(tau=1.5)


# ---- video chunks (VMoBA 1-D / 2-D / 3-D) ---------------------------------------------------------------

from oracle import check_close, box_ids_reference, math_attention  # noqa: E402
from sparse_attn import TokenLayout, sparse_attention  # noqa: E402
from sparse_attn.patterns import VideoChunkSelect  # noqa: E402
from sparse_attn.patterns.hierarchical import box_chunk_ids  # noqa: E402


def _ref_ids(lay, shape):
    return box_ids_reference(lay, shape)


def _ref_video_chunks(q, k, lay, shape, bm, rule, kk, tau):
    ids = _ref_ids(lay, shape)
    perm = torch.sort(ids, stable=True).indices
    n_c, n_qb = int(ids.max()) + 1, -(-lay.seq_len // bm)
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], n_qb, n_c, dtype=torch.bool)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            kc = torch.stack([k[b, h // group, ids == c].double().mean(0) * math.sqrt(int((ids == c).sum()))
                              if (ids == c).any() else torch.zeros(k.shape[-1], dtype=torch.float64)
                              for c in range(n_c)])
            for m in range(n_qb):
                rows = perm[m * bm:(m + 1) * bm]
                g = kc @ q[b, h, rows].double().mean(0)
                own = set(ids[rows].tolist()) | ({0} if lay.text_len else set())
                if lay.text_len and 0 in ids[rows].tolist():
                    out[b, h, m] = True
                    continue
                cand = [c for c in range(n_c) if c not in own and (ids == c).any()]  # no text: chunk 0 empty
                keep = set(own)
                if rule == "topk":
                    keep |= set(sorted(cand, key=lambda c: -g[c].item())[:kk])
                elif cand:
                    gc = g[cand]
                    norm = (gc - gc.min()) / max((gc.max() - gc.min()).item(), 1e-12)
                    acc, total = 0.0, norm.sum().item()
                    for n, i in enumerate(torch.argsort(norm, descending=True).tolist()):
                        if n > 0 and acc >= tau * total:
                            break
                        keep.add(cand[i])
                        acc += norm[i].item()
                out[b, h, m, sorted(keep)] = True
    return out


LAYOUTS = [TokenLayout.video(3, 6, 8, text_len=10), TokenLayout.video(4, 4, 5, text_len=7, text_position="after"),
           TokenLayout.video(2, 8, 8)]


@pytest.mark.parametrize("shape", [(1, 6, 8), (3, 4, 4), (2, 3, 4)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("li", range(3))
@pytest.mark.parametrize("rule", ["topk", "threshold"])
def test_video_chunk_map_matches_reference(shape, li, rule):
    lay = LAYOUTS[li]
    assert torch.equal(box_chunk_ids(lay, shape), _ref_ids(lay, shape))
    gen = torch.Generator().manual_seed(li)
    q = torch.randn(1, 4, lay.seq_len, 16, generator=gen)
    k = torch.randn(1, 2, lay.seq_len, 16, generator=gen)
    pat = VideoChunkSelect(chunk_shape=shape, rule=rule, k=2, tau=0.4, block_size=16, layout=lay)
    got, ids_p, perm = pat.chunk_map(q, k)
    assert torch.equal(ids_p, torch.sort(ids_p).values)  # chunks contiguous
    assert torch.equal(got, _ref_video_chunks(q, k, lay, shape, 16, rule, 2, 0.4))


def test_video_chunk_attention_matches_oracle():
    lay = LAYOUTS[0]
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 2, lay.seq_len, 16, generator=gen)
    k, v = torch.randn(2, 2, lay.seq_len, 16, generator=gen), torch.randn(2, 2, lay.seq_len, 16, generator=gen)
    mask = VideoChunkSelect(chunk_shape=(1, 3, 4), rule="topk", k=2, block_size=16).build(q, k, layout=lay)
    tok = mask.to_dense()
    assert tok[..., lay.text_start:lay.text_start + lay.text_len].all()  # text keys kept by every query
    ref, _ = math_attention(q, k, v, tok)
    low, _ = math_attention(q, k, v, tok, dtype=torch.float32)
    check_close(sparse_attention(q, k, v, mask), ref, low)


def test_video_chunk_errors():
    pat = VideoChunkSelect(chunk_shape=[1, 4, 4])
    assert pattern_from_json(pat.to_json()) == pat
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="video TokenLayout"):
        pat.build(q, q)
    with pytest.raises(ValueError, match="causal=True"):
        pat.build(q, q, causal=True, layout=TokenLayout.video(1, 8, 8))
    with pytest.raises(ValueError, match="chunk_shape"):
        VideoChunkSelect(chunk_shape=(1, 4))
    with pytest.raises(ValueError, match="chunk_shape\\[1\\]"):
        VideoChunkSelect(chunk_shape=(1, 0, 4))
