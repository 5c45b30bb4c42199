"""Decode over a KV cache: the split-K kernel (interpreter), the CPU path and the reference against the fp64
oracle on the selected pages; paged = contiguous; all pages = dense, bit for bit; bad inputs."""

import pytest
import torch

from oracle import check_close, check_lse, math_attention
from sparse_attn import sparse_attention_with_kvcache
from sparse_attn.kvcache import PageSummaries, append_kv
from sparse_attn_kernels.reference_decode import decode_fwd_ref, visible_keys


def on_device(backend, *tensors):
    """The tensors on CUDA for the Triton backend when a GPU is there (else the interpreter runs them on CPU)."""
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return tuple(None if t is None else t.to(dev) for t in tensors)


def random_pages(batch, n_kv_heads, seqlens, page_size, density, shared=False):
    """Sorted page lists ``[B, Hkv|1, W]`` keeping about ``density`` of each row's pages (-1 padded)."""
    n_pages = int(-(-seqlens.max() // page_size))
    heads = 1 if shared else n_kv_heads
    keep = torch.rand(batch, heads, n_pages) < density
    rows = -(-seqlens // page_size)
    keep &= torch.arange(n_pages)[None, None] < rows[:, None, None]
    keep[:, :, 0] = True
    from sparse_attn.patterns.decode import pages_from_keep
    return pages_from_keep(keep)


def to_paged(cache, page_size, n_phys=None, gen=None):
    """Contiguous ``[B, Hkv, L, D]`` -> paged ``[num_pages, P, Hkv, D]`` with a shuffled block table
    (spare physical pages stay NaN)."""
    batch, n_kv_heads, length, dim = cache.shape
    per_row = -(-length // page_size)
    n_phys = n_phys or batch * per_row + 3
    perm = torch.randperm(n_phys, generator=gen)[:batch * per_row].view(batch, per_row)
    paged = torch.full((n_phys, page_size, n_kv_heads, dim), float("nan"), dtype=cache.dtype)
    padded = torch.nn.functional.pad(cache, (0, 0, 0, per_row * page_size - length), value=float("nan"))
    paged[perm] = padded.view(batch, n_kv_heads, per_row, page_size, dim).permute(0, 2, 3, 1, 4)
    return paged, perm.to(torch.int32)


def poison_unseen(cache, keep_any):
    """NaN/Inf in every cache position no query row sees (``keep_any [B, Hkv, L]``)."""
    out = cache.clone()
    bad = torch.where(torch.rand(out.shape[:3]) < 0.5, float("nan"), float("inf")).to(out.dtype)
    return torch.where(keep_any[..., None], out, bad[..., None])


CASES = [  # B, Hq, Hkv, Lq, D, L (cache), seqlens, page size, density
    pytest.param(2, 4, 2, 1, 32, 100, (100, 37), 16, 0.4, id="gqa-decode-ragged"),
    pytest.param(1, 4, 1, 5, 64, 161, (150,), 32, 0.5, id="mqa-lq5-causal"),
    pytest.param(2, 2, 2, 16, 16, 70, (70, 16), 16, 1.0, id="mha-lq16-all-pages"),
    pytest.param(1, 8, 2, 3, 80, 200, (197,), 16, 0.3, id="d80-lq3"),
    pytest.param(2, 2, 1, 2, 16, 300, (290, 129), 128, 0.7, id="page128-subtiles"),
    # caches of whole pages: the CPU path copies pages, not key rows
    pytest.param(2, 4, 2, 1, 32, 128, (128, 45), 16, 0.4, id="whole-pages-ragged"),
    pytest.param(1, 4, 2, 4, 32, 192, (190,), 32, 0.5, id="whole-pages-lq4-causal"),
]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float16),
                                           ("triton", torch.float32), ("triton", torch.float16),
                                           ("ref", torch.float32)])
@pytest.mark.parametrize("batch,n_q_heads,n_kv_heads,q_len,dim,length,seqlens,page_size,density", CASES)
def test_decode_matches_fp64_oracle(batch, n_q_heads, n_kv_heads, q_len, dim, length, seqlens, page_size, density,
                                    backend, dtype, paged):
    if backend == "triton" and (dtype == torch.float16) and dim == 80 and paged:
        pytest.skip("one fp16 d80 interpreter case is enough")
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    q = torch.randn(batch, n_q_heads, q_len, dim).to(dtype)
    k = torch.randn(batch, n_kv_heads, length, dim).to(dtype)
    v = torch.randn(batch, n_kv_heads, length, dim).to(dtype)
    pages = random_pages(batch, n_kv_heads, seqlens.long(), page_size, density)
    counts = (pages >= 0).sum(-1).int()
    keep = visible_keys(seqlens, counts, pages, page_size, length, q_len, True)  # [B, Hkv, Lq, L]
    ref, ref_lse = math_attention(q, k, v, keep, dtype=torch.float64)
    lowp, _ = math_attention(q, k, v, keep, dtype=dtype)
    kp, vp = poison_unseen(k, keep.any(2)), poison_unseen(v, keep.any(2))  # excluded keys must never matter
    table = None
    if paged:
        gen = torch.Generator().manual_seed(1)
        (kp, table), (vp, _) = to_paged(kp, page_size, gen=gen), to_paged(vp, page_size, gen=torch.Generator().manual_seed(1))
    if backend == "ref":
        o, lse = decode_fwd_ref(q, kp, vp, seqlens, counts, pages, table, True, dim ** -0.5, page_size)
    else:
        q, kp, vp, seqlens, pages, table = on_device(backend, q, kp, vp, seqlens, pages, table)
        o, lse = sparse_attention_with_kvcache(q, kp, vp, seqlens, block_table=table, pages=pages, page_size=page_size,
                                               return_lse=True, backend=backend)
        o, lse = o.cpu(), lse.cpu()
    assert o.dtype == dtype and o.shape == q.shape and lse.shape == q.shape[:3]
    check_close(o, ref, lowp, dtype=dtype)
    check_lse(lse, ref_lse)


TOKEN_CASES = [  # B, Hq, Hkv, Lq, D, L (cache), seqlens, density, splits
    pytest.param(2, 4, 2, 1, 32, 300, (300, 97), 0.3, None, id="gqa-ragged"),
    pytest.param(1, 6, 2, 3, 80, 200, (190,), 0.5, 3, id="d80-lq3-causal-splits"),
    pytest.param(1, 2, 1, 1, 16, 400, (400,), 0.9, 2, id="several-tiles-per-split"),
]


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("triton", torch.float32),
                                           ("triton", torch.float16)])
@pytest.mark.parametrize("batch,n_q_heads,n_kv_heads,q_len,dim,length,seqlens,density,splits", TOKEN_CASES)
def test_token_lists_match_fp64_oracle(batch, n_q_heads, n_kv_heads, q_len, dim, length, seqlens, density, splits,
                                       backend, dtype):
    """``page_size=1``: the list holds key positions (a token-granular selection); keys it leaves out are
    poisoned and never reach an output; the kernel gathers them a tile at a time, split-K over the list."""
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    q = torch.randn(batch, n_q_heads, q_len, dim).to(dtype)
    k = torch.randn(batch, n_kv_heads, length, dim).to(dtype)
    v = torch.randn(batch, n_kv_heads, length, dim).to(dtype)
    toks = random_pages(batch, n_kv_heads, seqlens.long(), 1, density)
    toks[:, :, :1] = torch.where(toks[:, :, :1] >= 0, toks[:, :, :1], 0)
    counts = (toks >= 0).sum(-1).int()
    keep = visible_keys(seqlens, counts, toks, 1, length, q_len, True)  # [B, Hkv, Lq, L]
    ref, ref_lse = math_attention(q, k, v, keep, dtype=torch.float64)
    lowp, _ = math_attention(q, k, v, keep, dtype=dtype)
    kp, vp = poison_unseen(k, keep.any(2)), poison_unseen(v, keep.any(2))
    q, kp, vp, seqlens, toks = on_device(backend, q, kp, vp, seqlens, toks)
    o, lse = sparse_attention_with_kvcache(q, kp, vp, seqlens, pages=toks, page_size=1, return_lse=True,
                                           backend=backend, n_splits=splits)
    check_close(o.cpu(), ref, lowp, dtype=dtype)
    check_lse(lse.cpu(), ref_lse)


def test_token_lists_refuse_a_paged_cache_on_the_triton_kernel():
    from sparse_attn_kernels.decode.fwd import decode_fwd

    q, kc = torch.randn(1, 2, 1, 16), torch.randn(4, 16, 1, 16)
    one = torch.ones(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous cache"):
        decode_fwd(q, kc, kc, torch.tensor([20], dtype=torch.int32), one, torch.zeros(1, 1, 1, dtype=torch.int32),
                   torch.zeros(1, 2, dtype=torch.int32), False, 0.25, 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_pages_is_dense_bit_for_bit_and_paged_equals_contiguous(backend):
    batch, n_q_heads, n_kv_heads, dim, length, page_size = 2, 4, 2, 32, 96, 16
    q = torch.randn(batch, n_q_heads, 1, dim)
    k, v = torch.randn(batch, n_kv_heads, length, dim), torch.randn(batch, n_kv_heads, length, dim)
    seqlens = torch.tensor([96, 50], dtype=torch.int32)
    every = torch.arange(length // page_size, dtype=torch.int32)[None, None].repeat(batch, n_kv_heads, 1)
    every[1, :, 4:] = -1  # row 1 lists its own 4 pages only
    q, k, v, seqlens, every = on_device(backend, q, k, v, seqlens, every)
    dense = sparse_attention_with_kvcache(q, k, v, seqlens, backend=backend, return_lse=True)
    sparse = sparse_attention_with_kvcache(q, k, v, seqlens, pages=every, backend=backend, return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(dense, sparse))
    kp, table = to_paged(k.cpu(), page_size, gen=torch.Generator().manual_seed(3))
    vp, _ = to_paged(v.cpu(), page_size, gen=torch.Generator().manual_seed(3))
    pages = random_pages(batch, n_kv_heads, seqlens.cpu().long(), page_size, 0.5)
    kp, vp, table, pages = on_device(backend, kp, vp, table, pages)
    contiguous = sparse_attention_with_kvcache(q, k, v, seqlens, pages=pages, backend=backend, return_lse=True)
    paged = sparse_attention_with_kvcache(q, kp, vp, seqlens, block_table=table, pages=pages, backend=backend,
                                          return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(contiguous, paged))


def test_rows_that_see_nothing_give_zero_and_splits_merge():
    q, k = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 64, 16)
    seqlens = torch.tensor([0, 64], dtype=torch.int32)  # row 0: an empty cache
    for backend in ("torch", "triton"):
        args = on_device(backend, q, k, seqlens)
        o, lse = (t.cpu() for t in sparse_attention_with_kvcache(args[0], args[1], args[1], args[2], backend=backend,
                                                                   return_lse=True, n_splits=3))
        assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.isneginf(lse[0]).all()
        ref, ref_lse = math_attention(q[1:], k[1:], k[1:])
        torch.testing.assert_close(o[1:].double(), ref, atol=1e-5, rtol=0)
        check_lse(lse[1:], ref_lse)


def test_nan_in_a_selected_key_marks_only_the_rows_that_see_it():
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16)
    v[0, 0, 63] = float("nan")  # the newest key: only the last query sees it (causal)
    for backend in ("torch", "triton"):
        args = on_device(backend, q, k, v, torch.tensor([64]))
        o = sparse_attention_with_kvcache(*args, backend=backend).cpu()
        assert torch.isnan(o[:, :, 3]).all() and torch.isfinite(o[:, :, :3]).all()


def test_append_writes_the_cache_and_updates_summaries():
    batch, n_kv_heads, dim, page_size = 2, 2, 16, 16
    k_cache, v_cache = torch.zeros(batch, n_kv_heads, 80, dim), torch.zeros(batch, n_kv_heads, 80, dim)
    kp, table = to_paged(torch.zeros(batch, n_kv_heads, 80, dim), page_size, gen=torch.Generator().manual_seed(0))
    vp = kp.clone()
    seq = torch.tensor([0, 5], dtype=torch.int32)
    summ = PageSummaries.from_cache(k_cache, seq, page_size=page_size)
    summ_p = PageSummaries.from_cache(kp, seq, block_table=table)
    q = torch.randn(batch, 4, 3, dim)
    for step in range(12):  # chunks of 3 new tokens, crossing page boundaries
        new_k, new_v = torch.randn(batch, n_kv_heads, 3, dim), torch.randn(batch, n_kv_heads, 3, dim)
        o = sparse_attention_with_kvcache(q, k_cache, v_cache, seq, k=new_k, v=new_v, summaries=summ)
        o_p = sparse_attention_with_kvcache(q, kp, vp, seq, k=new_k, v=new_v, block_table=table, summaries=summ_p)
        assert torch.equal(o, o_p)
        seq = seq + 3
    fresh = PageSummaries.from_cache(k_cache, seq, page_size=page_size)
    for name in ("mean", "kmin", "kmax"):
        assert torch.equal(getattr(summ, name), getattr(fresh, name)), name
        assert torch.equal(torch.stack(summ_p.logical(table))[:, :, :, :5], torch.stack(fresh.logical())[:, :, :, :5])
    b1 = k_cache[1, :, 16:32]  # row 1, page 1: fully written
    torch.testing.assert_close(summ.mean[1, :, 1], b1.mean(1))
    assert torch.equal(summ.kmax[1, :, 1], b1.amax(1))
    ref_len = torch.tensor([36, 41])
    assert torch.equal(seq, ref_len.int())
    with pytest.raises(ValueError, match="overflows"):
        append_kv(k_cache, v_cache, torch.zeros(batch, n_kv_heads, 50, dim), torch.zeros(batch, n_kv_heads, 50, dim),
                  seq)


def test_bad_inputs_name_the_argument():
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 64, 32)
    seq = torch.tensor([64])
    f = sparse_attention_with_kvcache
    cases = [
        (lambda: f(torch.randn(1, 4, 17, 32), k, k, seq), ValueError, "at most 16"),
        (lambda: f(q, k, k.half(), seq), TypeError, "v_cache"),
        (lambda: f(torch.randn(1, 3, 1, 32), k, k, seq), ValueError, "multiple of key/value heads"),
        (lambda: f(q, k, k, seq.float()), TypeError, "cache_seqlens"),
        (lambda: f(q, k, k, torch.tensor([65])), ValueError, "cache_seqlens"),
        (lambda: f(q, k, k, seq, pages=torch.tensor([[[0, 9]]])), ValueError, "pages must index"),
        (lambda: f(q, k, k, seq, pages=torch.tensor([[[2, 1]]])), ValueError, "strictly increasing"),
        (lambda: f(q, k, k, seq, pages=torch.tensor([[[-1, 1]]])), ValueError, "unused entries"),
        (lambda: f(q, k, k, seq, pages=torch.tensor([[[0.0]]])), TypeError, "pages"),
        (lambda: f(q, k, k, seq, pages=torch.zeros(1, 3, 2, dtype=torch.int32)), ValueError, "pages must have shape"),
        (lambda: f(q, k.view(4, 16, 2, 32), k.view(4, 16, 2, 32), seq, block_table=torch.zeros(1, 4)), TypeError,
         "block_table"),
        (lambda: f(q, k.view(4, 16, 2, 32), k.view(4, 16, 2, 32), seq, block_table=torch.zeros(2, 4, dtype=torch.int32)),
         ValueError, "block_table"),
        (lambda: f(q, k, k, seq, k=torch.randn(1, 2, 1, 16), v=torch.randn(1, 2, 1, 16)), ValueError, "k must"),
        (lambda: f(q, k, k, seq, k=torch.randn(1, 2, 1, 32)), ValueError, "together"),
        (lambda: f(q, k, k, seq, page_size=0), ValueError, "page_size"),
        (lambda: f(q, k, k, seq, page_size=12, backend="triton"), ValueError, "page_size"),
        (lambda: f(q, k, k, seq, backend="cuda"), ValueError, "backend"),
        (lambda: f(q.double(), k.double(), k.double(), seq, backend="triton"), TypeError, "float64"),
        (lambda: f(q, k, k, [64]), TypeError, "cache_seqlens"),
    ]
    for call, err, text in cases:
        with pytest.raises(err, match=text):
            call()


def test_empty_batch_and_reference_signature():
    q, k = torch.randn(0, 2, 1, 16), torch.randn(0, 2, 32, 16)
    o = sparse_attention_with_kvcache(q, k, k, torch.zeros(0, dtype=torch.int32))
    assert o.shape == q.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's limitation")
def test_bf16_is_refused_in_the_interpreter():
    q, k = torch.randn(1, 4, 1, 32).bfloat16(), torch.randn(1, 2, 64, 32).bfloat16()
    with pytest.raises(TypeError, match="bfloat16"):
        sparse_attention_with_kvcache(q, k, k, torch.tensor([64]), backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_views_are_read_in_place(backend):
    """A ``[B, L, H, D]`` buffer viewed as ``[B, H, L, D]`` (flash layout) and a q slice of a packed tensor."""
    packed = torch.randn(2, 6, 1, 32)  # q heads 0..3 are a slice
    q = packed[:, :4]
    k_buf, v_buf = torch.randn(2, 90, 2, 32), torch.randn(2, 90, 2, 32)
    k, v = k_buf.transpose(1, 2), v_buf.transpose(1, 2)
    seqlens = torch.tensor([90, 33], dtype=torch.int32)
    pages = random_pages(2, 2, seqlens.long(), 16, 0.5)
    want = sparse_attention_with_kvcache(q.contiguous(), k.contiguous(), v.contiguous(), seqlens, pages=pages,
                                         backend="torch")
    args = on_device(backend, q, k, v, seqlens, pages)
    got = sparse_attention_with_kvcache(*args[:4], pages=args[4], backend=backend).cpu()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reused_gather_buffers_never_alias_outputs():
    """The CPU path gathers into per-thread buffers that the next call overwrites: an earlier output must
    stay what it was, and calls of other shapes in between must not disturb later ones."""
    torch.manual_seed(3)
    seqlens = torch.tensor([128, 80], dtype=torch.int32)
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 128, 32), torch.randn(2, 2, 128, 32)
    pages = random_pages(2, 2, seqlens.long(), 16, 0.5)
    first = sparse_attention_with_kvcache(q, k, v, seqlens, pages=pages, backend="torch")
    kept = first.clone()
    q2, k2, v2 = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 96, 16), torch.randn(1, 1, 96, 16)
    s2 = torch.tensor([96], dtype=torch.int32)
    other = sparse_attention_with_kvcache(q2, k2, v2, s2, pages=random_pages(1, 1, s2.long(), 16, 0.6),
                                          backend="torch")
    assert torch.equal(first, kept)
    want = decode_fwd_ref(q.double(), k.double(), v.double(), seqlens, (pages >= 0).sum(-1).int(), pages, None,
                          True, 32 ** -0.5, 16)[0]
    again = sparse_attention_with_kvcache(q, k, v, seqlens, pages=pages, backend="torch")
    torch.testing.assert_close(again.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, first) and torch.isfinite(other).all()


def test_pages_from_keep_is_each_rows_sorted_page_list():
    from sparse_attn.patterns.decode import pages_from_keep

    keep = torch.rand(3, 4, 37) < 0.3
    keep[0, 0] = False  # a row that keeps nothing
    out = pages_from_keep(keep)
    assert out.dtype == torch.int32 and out.shape[-1] == int(keep.sum(-1).max())
    for b in range(3):
        for h in range(4):
            want = keep[b, h].nonzero().flatten().tolist()
            assert out[b, h].tolist() == want + [-1] * (out.shape[-1] - len(want))
