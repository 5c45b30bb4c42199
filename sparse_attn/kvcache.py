"""KV caches for decoding: appending new tokens, and per-page key summaries kept as tokens arrive.

Two layouts (the ``flash_attn_with_kvcache`` ones, with our head-major contiguous layout):

- contiguous: ``k_cache, v_cache [B, Hkv, Lmax, D]``; page ``p`` of row ``b`` is tokens ``[p*P, (p+1)*P)``;
- paged: ``k_cache, v_cache [num_pages, page_size, Hkv, D]`` and ``block_table`` int32 ``[B, max_pages]``:
  logical page ``p`` of row ``b`` is physical page ``block_table[b, p]``.

:class:`PageSummaries` holds, per page and kv head, the mean and the per-channel min and max of the
valid keys (those below the row's length); empty pages hold zeros. :meth:`PageSummaries.update`
recomputes only the pages that the appended tokens touched, so a selection never rescans the cache.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from sparse_attn_kernels._common.paged import logical_cache

_CHUNK_PAGES = 256  # pages summarized at a time when many are (a first summary of a long cache)
_FIT_KEYS = 8192  # keys per row a sketch basis is fitted on at most (evenly strided)
_REFIT_BELOW = 1024  # a basis fitted on fewer keys (per row, at most) is refitted when the keys double
_QUERY_RIDGE = 1e-3  # added to the query moment's eigenvalues (times their mean) before its inverse square root


def default_sketch_dtype(device) -> torch.dtype:
    """Dtype a :class:`KeySketch` keeps its projections in by default: bfloat16 on CUDA and on CPUs with native
    bf16 matrix products (half the bytes a selection reads: at 32k keys, 8 kv heads, rank 32 on a 2-core Xeon,
    scoring 1.16 -> 0.53 ms and the whole selection 6.2 -> 5.0 ms, 2026-12-07), float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        except (AttributeError, RuntimeError):
            return torch.float32
    return torch.float32


def _page_stats(keys, valid):
    """``keys [..., P, D]``, ``valid`` bool ``[..., P]`` -> float32 ``(mean, kmin, kmax)`` ``[..., D]``."""
    keys = keys.float()
    v = valid[..., None]
    n = valid.sum(-1, keepdim=True)  # [..., 1]
    mean = keys.masked_fill(~v, 0.0).sum(-2) / n.clamp(min=1)
    kmin = keys.masked_fill(~v, float("inf")).amin(-2)
    kmax = keys.masked_fill(~v, float("-inf")).amax(-2)
    empty = n == 0
    return mean, kmin.masked_fill(empty, 0.0), kmax.masked_fill(empty, 0.0)


def _key_gram(keys, valid):
    """float64 ``[Hkv, D, D]`` uncentered second moment (sum) of the valid keys (strided to ``_FIT_KEYS`` per row),
    or None when no key is valid."""
    batch, n_kv_heads, length, dim = keys.shape
    step = max(1, -(-length // _FIT_KEYS))
    keys, valid = keys[:, :, ::step].float(), valid[:, ::step]
    if not bool(valid.any()):
        return None
    x = keys.masked_fill(~valid[:, None, :, None], 0.0).transpose(0, 1).reshape(n_kv_heads, -1, dim)  # [Hkv, N, D]
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # a non-finite valid key must not spoil the basis
    return (x.transpose(1, 2) @ x).double()


def fit_key_basis(keys, valid, rank):
    """Top-``rank`` right singular vectors of each kv head's valid keys, uncentered (attention scores are dot
    products, and the subspace that best keeps ``k`` in the least-squares sense keeps ``q . k`` best on average).

    Args:
        keys: ``[B, Hkv, L, D]``; valid: bool ``[B, L]``; rank: ``1 <= rank <= D``.

    Returns:
        float32 ``[Hkv, D, rank]`` with orthonormal columns (zeros-free even when no key is valid: the first
        ``rank`` channels then).
    """
    n_kv_heads, dim = keys.shape[1], keys.shape[3]
    gram = _key_gram(keys, valid)  # [Hkv, D, D]: the right singular vectors are its eigenvectors
    if gram is None:
        return torch.eye(dim, rank, device=keys.device).expand(n_kv_heads, dim, rank).contiguous()
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs.flip(-1)[..., :rank].float().contiguous()


def fit_sketch_maps(keys, valid, rank, query_moment=None):
    """Key and query maps of a rank-``rank`` sketch: ``q . k ~ (q @ query_map) . (k @ key_map)``.

    Without ``query_moment``: the keys' own basis (:func:`fit_key_basis`) for both (``query_map`` None). With the
    queries' uncentered second moment ``query_moment [Hkv, D, D]`` (``E[q q^T]`` over a kv head's group), the
    rank-``r`` bilinear form that minimizes the expected squared error of ``q . k`` over those queries and the
    valid keys: with ``S = query_moment^(1/2)`` (ridge ``_QUERY_RIDGE`` of its mean eigenvalue) and ``U`` the top
    eigenvectors of ``S C_k S``, ``key_map = S U`` and ``query_map = S^-1 U``. Directions the queries never probe
    then get no rank, whatever the keys' energy there. Heads whose moment is not finite or zero fall back to
    the keys' basis. On SmolLM2 (4k prompt, rank 16 of 64, 1/8 of the keys; benchmarks/sketch_mass.py) the
    exact attention mass the selected keys hold rose from 93.2% to 94.2% on the essays (exact scores: 95.2%) and
    92.5% -> 93.6% on Shakespeare (94.7%).

    Returns:
        float32 ``(key_map [Hkv, D, r], query_map [Hkv, D, r] | None)``.
    """
    if query_moment is None:
        return fit_key_basis(keys, valid, rank), None
    dim = keys.shape[3]
    gram = _key_gram(keys, valid)
    if gram is None:
        return fit_key_basis(keys, valid, rank), None
    cq = query_moment.to(keys.device, torch.float64)
    eye = torch.eye(dim, dtype=torch.float64, device=keys.device)
    trace = cq.diagonal(dim1=-2, dim2=-1).sum(-1)  # [Hkv]
    usable = torch.isfinite(cq).all(-1).all(-1) & (trace > 0)
    cq = torch.where(usable[:, None, None], cq, eye)  # such heads: S = I, the keys' basis
    w, vecs = torch.linalg.eigh(cq)
    w = w.clamp(min=0)
    w = (w + _QUERY_RIDGE * w.mean(-1, keepdim=True)) / w.mean(-1, keepdim=True)  # scale-free: mean 1
    half = (vecs * w.sqrt()[:, None, :]) @ vecs.transpose(1, 2)  # S
    inv_half = (vecs * w.rsqrt()[:, None, :]) @ vecs.transpose(1, 2)  # S^-1
    _, u = torch.linalg.eigh(half @ gram @ half)
    u = u.flip(-1)[..., :rank]  # [Hkv, D, r]
    return (half @ u).float().contiguous(), (inv_half @ u).float().contiguous()


@dataclass
class KeySketch:
    """Each key projected on a per-kv-head basis of ``rank`` directions (Loki's low-rank keys), kept per token.

    ``basis`` float32 ``[Hkv, D, r]``: the key map (``proj = k @ basis``); ``query_map`` float32 ``[Hkv, D, r]`` or
    None (then ``basis``, orthonormal, maps the queries too): ``q . k ~ (q @ query_map) . proj``
    (:func:`fit_sketch_maps`; ``query_moment`` is what it was fitted with, kept for refits). ``proj`` bfloat16
    or float32 (:func:`default_sketch_dtype`) ``[B, Hkv, Lcap, r]`` (contiguous caches, token ``t`` of row ``b``
    at ``[b, :, t]``) or ``[num_pages, Hkv, page_size, r]`` (paged, per physical page); entries past a row's
    length hold zeros or stale values and must be masked by the reader. ``fitted_on``: keys per row (at most)
    the basis was fitted on. A selection that scores every key through the sketch reads ``r / D`` of the key
    cache.
    """

    basis: torch.Tensor
    proj: torch.Tensor
    fitted_on: int
    query_map: Optional[torch.Tensor] = None
    query_moment: Optional[torch.Tensor] = None

    @property
    def query_basis(self) -> torch.Tensor:
        """``[Hkv, D, r]``: the map of the queries (``query_map``, else ``basis``)."""
        return self.basis if self.query_map is None else self.query_map

    @property
    def rank(self) -> int:
        return self.basis.shape[-1]


def num_pages(k_cache, page_size, block_table=None):
    """Logical pages per batch row."""
    return block_table.shape[1] if block_table is not None else -(-k_cache.shape[2] // page_size)


@dataclass
class PageSummaries:
    """Key summaries per page: ``mean``, ``kmin``, ``kmax`` float32.

    Contiguous caches: ``[B, Hkv, NP, D]`` (``NP = ceil(Lmax / page_size)``), per logical page; paged caches:
    ``[num_pages, Hkv, D]``, per physical page (rows that share a page share its summary). Built with
    ``stats=False`` (a selection that reads only the sketch, as ``loki``) the three hold no channel (last dim
    0: no memory, nothing recomputed per step) and :attr:`has_stats` is False.

    Example:
        >>> k = torch.randn(1, 2, 40, 16)
        >>> s = PageSummaries.from_cache(k, torch.tensor([40]), page_size=16)
        >>> tuple(s.mean.shape), bool(torch.allclose(s.mean[0, :, 0], k[0, :, :16].mean(1)))
        ((1, 2, 3, 16), True)
    """

    mean: torch.Tensor
    kmin: torch.Tensor
    kmax: torch.Tensor
    page_size: int
    paged: bool
    sketch: Optional[KeySketch] = None

    @classmethod
    def from_cache(cls, k_cache, cache_seqlens, *, page_size=16, block_table=None, rank=None,
                   sketch_dtype=None, query_moment=None, stats=True) -> "PageSummaries":
        """Summaries of every page from the cache contents (``cache_seqlens [B]`` valid keys per row); with
        ``rank`` (an int in ``[1, D]``) also a :class:`KeySketch` fitted on those keys (and on the queries'
        second moment ``query_moment [Hkv, D, D]`` when given: :func:`fit_sketch_maps`), its projections kept in
        ``sketch_dtype`` (bfloat16 or float32; None: :func:`default_sketch_dtype` of the cache's device).
        ``stats=False``: no per-page mean / min / max (for selections that read the sketch only)."""
        if block_table is not None:
            page_size = k_cache.shape[1]
            shape = (k_cache.shape[0], k_cache.shape[2], k_cache.shape[3])
        else:
            shape = (k_cache.shape[0], k_cache.shape[1], num_pages(k_cache, page_size), k_cache.shape[3])
        dim = k_cache.shape[-1]
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= dim):
            raise ValueError(f"rank must be an int in [1, {dim}] (the head dim), got {rank!r}.")
        if sketch_dtype is None:
            sketch_dtype = default_sketch_dtype(k_cache.device)
        if sketch_dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"sketch_dtype must be torch.bfloat16 or torch.float32, got {sketch_dtype!r}.")
        n_kv_heads = k_cache.shape[2] if block_table is not None else k_cache.shape[1]
        if query_moment is not None and (not isinstance(query_moment, torch.Tensor) or
                                         tuple(query_moment.shape) != (n_kv_heads, dim, dim)):
            got = list(query_moment.shape) if isinstance(query_moment, torch.Tensor) else type(query_moment).__name__
            raise ValueError(f"query_moment must be a tensor [Hkv={n_kv_heads}, D={dim}, D={dim}], got {got}.")
        if not isinstance(stats, bool):
            raise TypeError(f"stats must be a bool, got {type(stats).__name__}.")
        if not stats and rank is None:
            raise ValueError("stats=False keeps neither page statistics nor a sketch: give rank= too.")
        zeros = torch.zeros(shape[:-1] + ((shape[-1] if stats else 0),), dtype=torch.float32, device=k_cache.device)
        out = cls(zeros, zeros.clone(), zeros.clone(), int(page_size), block_table is not None)
        seq = torch.as_tensor(cache_seqlens, device=k_cache.device)
        start = torch.zeros_like(seq)
        if rank is not None:
            out.sketch = out._fit_sketch(k_cache, seq, block_table, rank, sketch_dtype, query_moment)
        return out.update(k_cache, start, cache_seqlens, block_table=block_table)

    def _fit_sketch(self, k_cache, seqlens, block_table, rank, dtype, query_moment=None):
        """A new :class:`KeySketch` whose maps are fitted on the valid keys (its ``proj`` still empty)."""
        keys = logical_cache(k_cache, block_table if self.paged else None)  # [B, Hkv, L, D]
        valid = torch.arange(keys.shape[2], device=keys.device)[None, :] < seqlens.long()[:, None]  # [B, L]
        basis, query_map = fit_sketch_maps(keys, valid, rank, query_moment)
        if self.paged:
            shape = (k_cache.shape[0], k_cache.shape[2], self.page_size, rank)
        else:
            shape = (k_cache.shape[0], k_cache.shape[1], self.mean.shape[2] * self.page_size, rank)
        proj = torch.zeros(shape, dtype=dtype, device=k_cache.device)
        return KeySketch(basis, proj, int(seqlens.max()) if seqlens.numel() else 0, query_map, query_moment)

    def update(self, k_cache, start, end, *, block_table=None) -> "PageSummaries":
        """Recompute the pages holding tokens ``[start_b, end_b)`` of each row; ``end [B]`` is the row's length
        after the append. Returns self (updated in place)."""
        P, dev = self.page_size, k_cache.device
        start, end = torch.as_tensor(start, device=dev).long(), torch.as_tensor(end, device=dev).long()
        if end.numel() == 0 or bool((end <= start).all()):
            return self
        sk = self.sketch
        if sk is not None and sk.fitted_on < _REFIT_BELOW and int(end.max()) >= 2 * max(sk.fitted_on, 1):
            # a basis fitted on a short prefix: refit on the keys now there and project every key again
            self.sketch = self._fit_sketch(k_cache, end, block_table, sk.rank, sk.proj.dtype, sk.query_moment)
            start = torch.zeros_like(start)
        first = int((start // P).min())
        last = int(((end - 1).clamp(min=0) // P).max()) + 1
        pages = torch.arange(first, last, device=dev)  # [n] logical pages touched by some row
        offs = torch.arange(P, device=dev)
        if not self.paged:  # [B, Hkv, Lmax, D] -> pages [B, Hkv, n, P, D], a bounded number at a time
            n_tok = k_cache.shape[2]
            for c0 in range(first, last, _CHUNK_PAGES):
                c1 = min(last, c0 + _CHUNK_PAGES)
                tok = torch.arange(c0, c1, device=dev)[:, None] * P + offs  # [n, P]
                if self.has_stats:
                    keys = k_cache[:, :, tok.clamp(max=n_tok - 1)]  # [B, Hkv, n, P, D]
                    valid = (tok[None] < end[:, None, None]) & (tok[None] < n_tok)  # [B, n, P]
                    mean, kmin, kmax = _page_stats(keys, valid[:, None])
                    self.mean[:, :, c0:c1], self.kmin[:, :, c0:c1], self.kmax[:, :, c0:c1] = mean, kmin, kmax
                if self.sketch is not None:  # [B, Hkv, n*P, D] @ [Hkv, D, r] over the whole pages touched
                    t0, t1 = c0 * P, min(c1 * P, n_tok)
                    self.sketch.proj[:, :, t0:t1] = k_cache[:, :, t0:t1].float() @ self.sketch.basis
            return self
        # paged: only the (row, page) pairs a row owns and touched; their physical pages are written
        owned = (pages[None] >= start[:, None] // P) & (pages[None] * P < end[:, None])  # [B, n]
        b_idx, p_idx = owned.nonzero(as_tuple=True)
        page = pages[p_idx]
        phys = block_table[b_idx, page].long()  # [m]
        valid = page[:, None] * P + offs < end[b_idx, None]  # [m, P]
        keys = k_cache[phys].transpose(1, 2)  # [m, Hkv, P, D]
        if self.has_stats:
            mean, kmin, kmax = _page_stats(keys, valid[:, None])
            self.mean[phys], self.kmin[phys], self.kmax[phys] = mean, kmin, kmax
        if self.sketch is not None:  # [m, Hkv, P, D] @ [Hkv, D, r]
            self.sketch.proj[phys] = (keys.float() @ self.sketch.basis).to(self.sketch.proj.dtype)
        return self

    def grow(self, n_pages) -> "PageSummaries":
        """Contiguous summaries with room for at least ``n_pages`` pages (new pages empty); self if enough."""
        have = self.mean.shape[2]
        if self.paged or n_pages <= have:
            return self
        pad = max(n_pages, 2 * have) - have  # geometric: a growing cache reallocates O(log L) times
        grown = [torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (self.mean, self.kmin, self.kmax)]
        sketch = self.sketch
        if sketch is not None:
            proj = torch.nn.functional.pad(sketch.proj, (0, 0, 0, (have + pad) * self.page_size - sketch.proj.shape[2]))
            sketch = KeySketch(sketch.basis, proj, sketch.fitted_on, sketch.query_map, sketch.query_moment)
        return PageSummaries(*grown, page_size=self.page_size, paged=False, sketch=sketch)

    @property
    def has_stats(self) -> bool:
        """Whether the summaries keep per-page mean / min / max (False: built with ``stats=False``)."""
        return self.mean.shape[-1] > 0

    def _need_stats(self):
        if not self.has_stats:
            raise ValueError("these PageSummaries keep no page statistics (built with stats=False, for a "
                             "sketch-only selection): build them with stats=True for kinetics / quest.")

    def logical(self, block_table=None):
        """``(mean, kmin, kmax)`` per logical page ``[B, Hkv, NP, D]`` (paged: gathered by ``block_table``)."""
        self._need_stats()
        if not self.paged:
            return self.mean, self.kmin, self.kmax
        idx = block_table.long().clamp(min=0)  # entries past a row's pages are never selected
        return tuple(t[idx].transpose(1, 2) for t in (self.mean, self.kmin, self.kmax))

    def logical_pages(self, block_table=None) -> int:
        """Logical pages per row: ``NP`` (contiguous) or ``block_table.shape[1]`` (paged)."""
        return self.mean.shape[2] if not self.paged else block_table.shape[1]

    def logical_sketch(self, block_table=None):
        """``proj [B, Hkv, NP * page_size, r]`` of the sketch per logical token (paged: gathered by
        ``block_table``); raises ValueError when the summaries keep no sketch."""
        if self.sketch is None:
            raise ValueError("these PageSummaries keep no key sketch: build them with rank= "
                             "(PageSummaries.from_cache(..., rank=r)) for a sketch-based selection.")
        proj = self.sketch.proj
        if not self.paged:
            return proj[:, :, : self.mean.shape[2] * self.page_size]
        b, w = block_table.shape
        g = proj[block_table.long().clamp(min=0)]  # [B, W, Hkv, P, r]
        return g.transpose(1, 2).reshape(b, proj.shape[1], w * self.page_size, proj.shape[-1])

    def logical_mean(self, block_table=None):
        """``mean [B, Hkv, NP, D]`` alone (what a mean-based selection reads)."""
        self._need_stats()
        if not self.paged:
            return self.mean
        return self.mean[block_table.long().clamp(min=0)].transpose(1, 2)


def append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table=None, check=True):
    """Write ``k, v [B, Hkv, Lnew, D]`` at positions ``cache_seqlens[b] + [0, Lnew)`` of each row, in place
    (``check``: raise ValueError if a row would overflow the cache; this synchronizes with the device).

    Returns:
        int32 ``[B]``: the lengths after the append.
    """
    batch, _, new, _ = k.shape
    dev = k_cache.device
    seq = cache_seqlens.long()
    pos = seq[:, None] + torch.arange(new, device=dev)  # [B, Lnew]
    if block_table is None:
        capacity = k_cache.shape[2]
    else:
        capacity = block_table.shape[1] * k_cache.shape[1]
    if check and new and batch and int(pos.max()) >= capacity:
        raise ValueError(f"k: appending {new} tokens after cache_seqlens (max {int(seq.max())}) overflows the cache "
                         f"capacity of {capacity} tokens per row.")
    rows = torch.arange(batch, device=dev)[:, None]
    if block_table is None:  # k_cache[b, :, pos] -> [B, Lnew, Hkv, D]
        k_cache[rows, :, pos] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[rows, :, pos] = v.transpose(1, 2).to(v_cache.dtype)
    else:
        page_size = k_cache.shape[1]
        phys = block_table[rows, pos // page_size].long()  # [B, Lnew]
        k_cache[phys, pos % page_size] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[phys, pos % page_size] = v.transpose(1, 2).to(v_cache.dtype)
    return (seq + new).to(torch.int32)


__all__ = ["PageSummaries", "KeySketch", "default_sketch_dtype", "fit_key_basis", "fit_sketch_maps", "append_kv",
           "num_pages"]
