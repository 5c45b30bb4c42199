"""``sparse_attention_with_kvcache``: attention of a few new queries over the selected pages of a KV cache.

In the style of ``flash_attn_with_kvcache``, with this package's head-major layout: q ``[B, Hq, Lq, D]``
(``Lq <= 16``), a contiguous cache ``[B, Hkv, Lmax, D]`` or a paged one ``[num_pages, page_size, Hkv, D]``
with ``block_table [B, max_pages]``. ``pages`` (from a selection pattern, :mod:`sparse_attn.patterns.decode`)
lists the logical pages each (row, kv head) attends; None attends every page. CUDA tensors run the Triton
split-K kernel, CPU tensors the PyTorch path (``backend`` overrides).
"""

import torch

from sparse_attn_kernels.decode.cpu import decode_fwd_cpu

from .kvcache import PageSummaries, append_kv, num_pages

MAX_QUERIES = 16
_BACKENDS = ("auto", "triton", "torch")
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_tensor(x, name, rank, shape_doc):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {shape_doc} (rank {rank}), got {list(x.shape)}.")


def _check_index(x, name, shape, device):
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {x.dtype}.")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}.")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {x.device}.")


def _check_inputs(q, k_cache, v_cache, cache_seqlens, block_table, k, v, page_size):
    """Shapes, dtypes and devices; returns ``(n_kv_heads, page_size, capacity)``."""
    _check_tensor(q, "q", 4, "[B, Hq, Lq, D]")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q must have a floating dtype, got {q.dtype}.")
    batch, n_q_heads, q_len, head_dim = q.shape
    if q_len > MAX_QUERIES:
        raise ValueError(f"q must have at most {MAX_QUERIES} queries per row (decode), got Lq = {q_len}; "
                         "longer chunks go through sparse_attention.")
    paged = block_table is not None
    doc = "[num_pages, page_size, Hkv, D]" if paged else "[B, Hkv, Lmax, D]"
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(x, name, 4, doc)
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"{name} must share one dtype and device with q ({q.dtype}, {q.device}), got "
                            f"{x.dtype}, {x.device}.")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {list(k_cache.shape)}, got {list(v_cache.shape)}.")
    n_kv_heads = k_cache.shape[2] if paged else k_cache.shape[1]
    if k_cache.shape[3] != head_dim or (not paged and k_cache.shape[0] != batch):
        raise ValueError(f"k_cache must have shape {doc} with B = {batch} and D = {head_dim} like q, got "
                         f"{list(k_cache.shape)}.")
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_q_heads}) must be a multiple of key/value heads ({n_kv_heads}).")
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor [B], got {type(cache_seqlens).__name__}.")
    _check_index(cache_seqlens, "cache_seqlens", (batch,), q.device)
    if paged:
        _check_tensor(block_table, "block_table", 2, "[B, max_pages]")
        _check_index(block_table, "block_table", (batch, block_table.shape[1]), q.device)
        page_size = k_cache.shape[1]
        capacity = block_table.shape[1] * page_size
    else:
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}.")
        capacity = k_cache.shape[2]
    for name, x in (("k", k), ("v", v)):
        if x is None:
            continue
        _check_tensor(x, name, 4, "[B, Hkv, Lnew, D]")
        if x.shape[0] != batch or x.shape[1] != n_kv_heads or x.shape[3] != head_dim:
            raise ValueError(f"{name} must have shape [B={batch}, Hkv={n_kv_heads}, Lnew, D={head_dim}], got "
                             f"{list(x.shape)}.")
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"{name} must share one dtype and device with q, got {x.dtype}, {x.device}.")
    if (k is None) != (v is None) or (k is not None and k.shape != v.shape):
        raise ValueError("k and v must be given together, with one shape.")
    return n_kv_heads, page_size, capacity


def _check_pages(pages, batch, n_kv_heads, n_pages, device, check_values, row_pages):
    """``pages [B, Hkv|1, W]`` (-1 = unused, after the used entries) -> int32 ``(counts [B, Hkv], pages)``;
    ``counts`` leaves out the entries at or past ``row_pages [B]`` (pages past a row's length), a suffix."""
    _check_tensor(pages, "pages", 3, "[B, Hkv, W]")
    if pages.dtype not in _INDEX_DTYPES:
        raise TypeError(f"pages must be int32 or int64, got {pages.dtype}.")
    if pages.shape[0] != batch or pages.shape[1] not in (1, n_kv_heads):
        raise ValueError(f"pages must have shape [B={batch}, Hkv={n_kv_heads} or 1, W], got {list(pages.shape)}.")
    if pages.device != device:
        raise ValueError(f"pages must be on {device} like q, got {pages.device}.")
    used = pages >= 0
    counts = (used & (pages < row_pages[:, None, None])).sum(-1, dtype=torch.int32)  # [B, Hkv|1]
    if check_values and pages.numel():
        if bool((used[..., 1:] & ~used[..., :-1]).any()):
            raise ValueError("pages: unused entries (-1) must come after the used ones in each row.")
        if int(pages.max()) >= n_pages:
            raise ValueError(f"pages must index logical pages < {n_pages}, got {int(pages.max())}.")
        inc = (pages[..., 1:] > pages[..., :-1]) | ~used[..., 1:]
        if not bool(inc.all()):
            raise ValueError("pages must be strictly increasing in each row (sorted, no repeats).")
    pages = pages.to(torch.int32).contiguous()
    return counts.expand(batch, n_kv_heads), pages.expand(batch, n_kv_heads, pages.shape[-1])


def _triton_page(page_size, paged):
    """Pages the Triton kernel tiles: a power of two >= 16 tokens, or single keys (token lists, contiguous)."""
    return (page_size == 1 and not paged) or (page_size >= 16 and not page_size & (page_size - 1))


def _launcher(backend, device, dtype, page_size, paged):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
    # auto: pages the Triton kernel cannot tile (2 to 15 tokens, or not a power of two) take the PyTorch ops
    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or not _triton_page(page_size, paged))):
        return decode_fwd_cpu
    if dtype == torch.float64:
        raise TypeError("q: float64 runs on the PyTorch path only (backend='torch').")
    from sparse_attn_kernels._common.config import interpreting
    if dtype == torch.bfloat16 and interpreting():
        raise TypeError("q: bfloat16 cannot run in the Triton interpreter (no bf16 dot); use fp16/fp32 or "
                        "backend='torch'.")
    from sparse_attn_kernels.decode.fwd import decode_fwd
    return decode_fwd


def sparse_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, block_table=None, pages=None, k=None,
                                  v=None, causal=True, scale=None, return_lse=False, page_size=16,
                                  summaries=None, backend="auto", n_splits=None, check_pages=None):
    """Attention of ``q`` over the selected pages of a KV cache, appending ``k``, ``v`` first when given.

    Args:
        q: ``[B, Hq, Lq, D]``, ``Lq <= 16``: the newest ``Lq`` tokens of each row.
        k_cache, v_cache: contiguous ``[B, Hkv, Lmax, D]``, or paged ``[num_pages, page_size, Hkv, D]``.
        cache_seqlens: int ``[B]`` tokens in the cache before the append (after it when ``k`` is None).
        block_table: int ``[B, max_pages]`` physical page of each logical page (paged caches).
        pages: int ``[B, Hkv | 1, W]`` sorted logical pages each (row, kv head) attends, ``-1`` after the used
            entries; None: every page (dense decode).
        k, v: ``[B, Hkv, Lnew, D]`` new tokens written into the cache in place at ``cache_seqlens``.
        causal: bottom-right causal (query ``i`` sees keys ``<= seqlen - Lq + i``); only matters for ``Lq > 1``.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the natural-log LSE ``[B, Hq, Lq]`` (float32; ``-inf`` where nothing is seen).
        page_size: tokens per page of a contiguous cache (paged caches: ``k_cache.shape[1]``); 1: ``pages`` lists
            key positions (a token-granular selection, e.g. ``LokiSelect(granularity="token")``).
        summaries: :class:`~sparse_attn.kvcache.PageSummaries` updated for the appended tokens.
        backend: ``"auto"`` (Triton on CUDA for pages of a power of two >= 16 tokens, PyTorch ops otherwise),
            ``"triton"`` or ``"torch"``.
        n_splits: split-K ways per (row, kv head) of the Triton kernel; None chooses.
        check_pages: validate index values (``pages`` sorted and in range, lengths within the cache); each check
            synchronizes with the device, so the default is on for CPU tensors only.

    Returns:
        ``o [B, Hq, Lq, D]`` in q's dtype, or ``(o, lse)`` with ``return_lse``.

    Example:
        >>> q, kc = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 100, 32)
        >>> pages = torch.tensor([[[0, 6], [1, -1]]])          # kv head 0: pages 0 and 6; head 1: page 1
        >>> o = sparse_attention_with_kvcache(q, kc, kc, torch.tensor([100]), pages=pages)
        >>> tuple(o.shape)
        (1, 4, 1, 32)
    """
    n_kv_heads, page_size, capacity = _check_inputs(q, k_cache, v_cache, cache_seqlens, block_table, k, v, page_size)
    batch, _, q_len, head_dim = q.shape
    launch = _launcher(backend, q.device, q.dtype, page_size, block_table is not None)
    check = q.device.type == "cpu" if check_pages is None else bool(check_pages)  # value checks synchronize
    seqlens = cache_seqlens.to(torch.int32)
    if k is not None:
        before = seqlens
        seqlens = append_kv(k_cache, v_cache, k, v, seqlens, block_table, check=check)
        if summaries is not None:
            summaries.update(k_cache, before, seqlens, block_table=block_table)
    if check and batch and (int(seqlens.max()) > capacity or int(seqlens.min()) < 0):
        raise ValueError(f"cache_seqlens must lie in [0, {capacity}] (the cache capacity), got "
                         f"{seqlens.tolist() if batch <= 8 else (int(seqlens.min()), int(seqlens.max()))}.")
    n_pages = num_pages(k_cache, page_size, block_table)
    if launch is not decode_fwd_cpu and not _triton_page(page_size, block_table is not None):
        raise ValueError(f"page_size must be a power of two >= 16 (or 1 with a contiguous cache: token lists) for "
                         f"the Triton kernel, got {page_size}.")
    row_pages = (-(-seqlens // page_size)).clamp(max=n_pages)  # [B] pages holding keys
    if pages is None:
        counts = row_pages.to(torch.int32)[:, None].expand(batch, n_kv_heads)
        pages = torch.arange(n_pages, dtype=torch.int32, device=q.device)[None, None].expand(batch, n_kv_heads, -1)
    else:
        counts, pages = _check_pages(pages, batch, n_kv_heads, n_pages, q.device, check, row_pages)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if launch is not decode_fwd_cpu:
        q = q if q.stride(-1) == 1 else q.contiguous()
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError("k_cache and v_cache must have unit last stride for the Triton kernel.")
        seqlens = seqlens.contiguous()
        block_table = None if block_table is None else block_table.to(torch.int32).contiguous()
        if n_splits is None:  # from the cache's page count, so a selection splits like dense decode
            from sparse_attn_kernels.decode.fwd import default_splits
            n_pages16 = -(-n_pages * page_size // 16)  # token lists split like pages of 16
            n_splits = default_splits(n_pages16, batch, n_kv_heads, q.shape[1] // n_kv_heads * q_len, q.device)
    o, lse = launch(q, k_cache, v_cache, seqlens, counts, pages, block_table, bool(causal), scale, page_size,
                    n_splits=n_splits)
    return (o, lse.float()) if return_lse else o


class DecodeState:
    """Page summaries of caches handed over whole at every step (transformers' ``DynamicCache`` and
    ``StaticCache`` give the attention function ``key [B, Hkv, L, D]``), one entry per layer.

    :meth:`summaries` recomputes only the pages of the keys added since the layer's last call; a call with
    shorter lengths or another shape starts over, and :meth:`reset` (at every prefill) forgets a layer.
    :meth:`observe_queries` (at prefill) keeps each layer's query second moment, which a key sketch built after
    it is fitted with (:func:`~sparse_attn.kvcache.fit_sketch_maps`); :meth:`reset` keeps it.
    """

    def __init__(self):
        self._entries = {}
        self._queries = {}  # layer -> (sum of q q^T [Hkv, D, D] float64, rows)

    def observe_queries(self, layer, query, n_kv_heads, fresh=True):
        """Add the rows of ``query [B, Hq, Lq, D]`` to ``layer``'s query moment (``fresh``: start it over, as for
        a new sequence's prefill; otherwise, e.g. a later chunk, accumulate)."""
        rows = query.detach().float().reshape(query.shape[0], n_kv_heads, -1, query.shape[-1])  # [B, Hkv, N, D]
        rows = torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)
        # float32 products (a few ms per layer at 4k prompt tokens on 2 CPU cores), summed in float64
        gram = torch.einsum("bhnd,bhne->hde", rows, rows).double()  # [Hkv, D, D]
        count = rows.shape[0] * rows.shape[2]
        old = None if fresh else self._queries.get(layer)
        if old is not None and old[0].shape == gram.shape and old[0].device == gram.device:
            gram, count = old[0] + gram, old[1] + count
        self._queries[layer] = (gram, count)

    def query_moment(self, layer):
        """``E[q q^T]`` ``[Hkv, D, D]`` of the queries observed for ``layer`` (None: none)."""
        entry = self._queries.get(layer)
        return None if entry is None or entry[1] == 0 else entry[0] / entry[1]

    def reset(self, layer=None):
        """Forget ``layer`` (None: every layer)."""
        if layer is None:
            self._entries.clear()
        else:
            self._entries.pop(layer, None)

    def summaries(self, layer, key, seqlens, page_size, rank=None, stats=True) -> PageSummaries:
        """Summaries of ``key [B, Hkv, L, D]`` with ``seqlens [B]`` valid keys per row, kept up to date (with a
        key sketch of ``rank`` when given, fitted with the layer's observed query moment when there is one of the
        right shape; without per-page statistics when ``stats`` is False: :meth:`PageSummaries.from_cache`)."""
        entry = self._entries.get(layer)
        shape = (key.shape[0], key.shape[1], key.shape[3], page_size, key.dtype, key.device, rank, stats)
        need = -(-key.shape[2] // page_size)
        if entry is None or entry[0] != shape or bool((seqlens < entry[2]).any()):
            moment = self.query_moment(layer) if rank is not None else None
            if moment is not None and tuple(moment.shape) != (key.shape[1], key.shape[3], key.shape[3]):
                moment = None  # observed for another model or head layout
            summ = PageSummaries.from_cache(key, seqlens, page_size=page_size, rank=rank, query_moment=moment,
                                            stats=stats)
        else:
            summ = entry[1].grow(need).update(key, entry[2], seqlens)
        self._entries[layer] = (shape, summ, seqlens.clone())
        return summ


__all__ = ["sparse_attention_with_kvcache", "PageSummaries", "DecodeState", "MAX_QUERIES"]
