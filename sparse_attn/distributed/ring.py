"""Ring context parallelism: key/value shards move between ranks, each step attends one mask slice.

At step ``t`` rank ``r`` receives from ``src = r - t`` and sends to ``dst = r + t`` (mod world): only the
key blocks that the receiver's mask slices keep (:class:`RingPlan`), and nothing at all for a pair
that keeps none. The next step's transfer is posted before the current step computes. Partial
outputs merge exactly by log-sum-exp. The backward sends the key/value blocks again, recomputes each
step, and returns their dK/dV (float32) to the rank that owns them.
"""

import weakref

import torch

from ..mask import BlockSparseMask
from ..ops import sparse_attention
from ..stripe_mask import StripeSparseMask
from ._comm import all_gather_ints, exchange, group_info
from .plan import RingPlan, contiguous_chunks


def _blocks(x, need, bn):
    """Key blocks of a chunk ``x [B, H, n, D]`` where ``need [Bm', H|1, NKB]``: ``[P, bn, D]``."""
    b, h, n, d = x.shape
    nkb = need.shape[-1]
    x = torch.nn.functional.pad(x, (0, 0, 0, nkb * bn - n)).view(b, h, nkb, bn, d)
    return x[need.expand(b, h, nkb)]


def _pack(k, v, need, chunks, bn):
    """``[2, P, bn, D]``: the needed key blocks of every chunk of ``k``/``v`` (local layout ``chunks``)."""
    ks, vs = [], []
    for (off, _, n), nd in zip(chunks, need):
        ks.append(_blocks(k[:, :, off:off + n], nd, bn))
        vs.append(_blocks(v[:, :, off:off + n], nd, bn))
    return torch.stack([torch.cat(ks), torch.cat(vs)])


def _unpack(packed, need, chunks, like, bn):
    """Inverse of :func:`_pack` into zero-filled ``k, v`` shaped like ``like [B, H, L_src, D]`` (dtype of packed)."""
    b, h, _, d = like.shape
    out = packed.new_zeros((2, b, h, sum(n for _, _, n in chunks), d))
    pos = 0
    for (off, _, n), nd in zip(chunks, need):
        nkb = nd.shape[-1]
        sel = nd.expand(b, h, nkb)
        p = int(sel.sum())
        buf = packed.new_zeros((2, b, h, nkb, bn, d))
        buf[:, sel] = packed[:, pos:pos + p]
        out[:, :, :, off:off + n] = buf.view(2, b, h, nkb * bn, d)[:, :, :, :n]
        pos += p
    return out[0], out[1]


def _n_blocks(need, b, h):
    return sum(int(nd.expand(b, h, nd.shape[-1]).sum()) for nd in need)


def _post(plan, t, k, v, group, tag, dtype=None):
    """Post step ``t``'s key/value transfer: send own blocks to ``r + t``, receive ``r - t``'s."""
    rank, world = plan.rank, plan.world
    dst, src = (rank + t) % world, (rank - t) % world
    b, h, _, d = k.shape
    sends, recvs = [], []
    if plan.sends(dst, rank):
        sends.append((dst, _pack(k, v, plan.need[(dst, rank)], plan.local_kv(rank), plan.block_n)))
    if plan.sends(rank, src):
        p = _n_blocks(plan.need[(rank, src)], b, h)
        recvs.append((src, (2, p, plan.block_n, d), dtype or k.dtype, k.device))
    return exchange(sends, recvs, group, tag, step=t), src


def _kv_of(plan, t, pending, k, v):
    """The key/value shard of step ``t``'s source (zeros where not sent), or None when nothing came."""
    work, src = pending
    got = work.wait()
    if not got:
        return None
    like = k.new_empty((k.shape[0], k.shape[1], sum(n for _, _, n in plan.local_kv(src)), k.shape[3]))
    return _unpack(got[0], plan.need[(plan.rank, src)], plan.local_kv(src), like, plan.block_n)


def _merge(o_acc, lse_acc, o_t, lse_t):
    """Exact merge of two partial attentions by their log-sum-exp (empty rows: lse -inf, o 0)."""
    lse = torch.logaddexp(lse_acc, lse_t)
    dead = torch.isneginf(lse)
    w_a = torch.where(dead, 0.0, torch.exp(lse_acc - lse))[..., None]
    w_t = torch.where(dead, 0.0, torch.exp(lse_t - lse))[..., None]
    return o_acc * w_a + o_t.float() * w_t, lse


def _pairs(plan, src):
    for (i, s, j), (m, lc) in plan.steps.items():
        if s == src:
            yield i, j, m, lc


def _forward(q, k, v, plan, scale, group):
    rank, world = plan.rank, plan.world
    qs = plan.local_q()
    b, hq, _, d = q.shape
    o = [q.new_zeros((b, hq, n, d), dtype=torch.float32) for _, _, n in qs]
    lse = [q.new_full((b, hq, n), float("-inf"), dtype=torch.float32) for _, _, n in qs]
    pending = None
    for t in range(world):
        src = (rank - t) % world
        kv = (k, v) if t == 0 else _kv_of(plan, t, pending, k, v)
        if t + 1 < world:  # the next transfer runs while this step computes
            pending = _post(plan, t + 1, k, v, group, "kv")
        if kv is None:
            continue
        ks = plan.local_kv(src)
        for i, j, m, lc in _pairs(plan, src):
            (qo, _, qn), (ko, _, kn) = qs[i], ks[j]
            o_t, lse_t = sparse_attention(q[:, :, qo:qo + qn], kv[0][:, :, ko:ko + kn], kv[1][:, :, ko:ko + kn], m,
                                          causal=lc, scale=scale, return_lse=True)
            o[i], lse[i] = _merge(o[i], lse[i], o_t, lse_t)
    return torch.cat(o, 2), torch.cat(lse, 2)


def _backward(q, k, v, o, lse, do, dlse, plan, scale, group):
    rank, world = plan.rank, plan.world
    qs = plan.local_q()
    dq, dk, dv = (torch.zeros_like(x, dtype=torch.float32) for x in (q, k, v))
    pending = None
    for t in range(world):
        src, dst = (rank - t) % world, (rank + t) % world
        kv = (k, v) if t == 0 else _kv_of(plan, t, pending, k, v)
        if t + 1 < world:  # the next transfer runs while this step computes
            pending = _post(plan, t + 1, k, v, group, "kv")
        ks = plan.local_kv(src)
        if kv is not None:
            gk, gv = (dk, dv) if t == 0 else (torch.zeros_like(kv[0], dtype=torch.float32),
                                              torch.zeros_like(kv[1], dtype=torch.float32))
            for i, j, m, lc in _pairs(plan, src):
                (qo, _, qn), (ko, _, kn) = qs[i], ks[j]
                rows = slice(qo, qo + qn)
                q_i = q[:, :, rows].detach().requires_grad_()
                k_j = kv[0][:, :, ko:ko + kn].detach().requires_grad_()
                v_j = kv[1][:, :, ko:ko + kn].detach().requires_grad_()
                with torch.enable_grad():
                    o_t, lse_t = sparse_attention(q_i, k_j, v_j, m, causal=lc, scale=scale, return_lse=True)
                    lse_i = lse[:, :, rows]
                    w = torch.where(torch.isneginf(lse_i), 0.0, torch.exp(lse_t - lse_i))  # d lse / d lse_t
                    g_o = (w[..., None] * do[:, :, rows]).to(o_t.dtype)
                    g_lse = w * ((do[:, :, rows] * (o_t.float() - o[:, :, rows])).sum(-1) + dlse[:, :, rows])
                    g = torch.autograd.grad((o_t, lse_t), (q_i, k_j, v_j), (g_o, g_lse), allow_unused=True)
                for acc, x, sl in ((dq, g[0], rows), (gk, g[1], slice(ko, ko + kn)), (gv, g[2], slice(ko, ko + kn))):
                    if x is not None:
                        acc[:, :, sl] += x.float()
        if t == 0:
            continue
        sends = [(src, _pack(gk, gv, plan.need[(rank, src)], ks, plan.block_n))] if kv is not None else []
        recvs = []
        if plan.sends(dst, rank):
            p = _n_blocks(plan.need[(dst, rank)], k.shape[0], k.shape[1])
            recvs.append((dst, (2, p, plan.block_n, k.shape[3]), torch.float32, k.device))
        got = exchange(sends, recvs, group, "dkv", step=world + t).wait()
        if got:
            gk_back, gv_back = _unpack(got[0], plan.need[(dst, rank)], plan.local_kv(rank),
                                       dk, plan.block_n)
            dk += gk_back
            dv += gv_back
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, group):
        o, lse = _forward(q, k, v, plan, scale, group)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.meta = (plan, scale, group)
        return o.to(q.dtype), lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        plan, scale, group = ctx.meta
        do = torch.zeros_like(o) if do is None else do.float()
        dlse = torch.zeros_like(lse) if dlse is None else dlse.float()
        return (*_backward(q, k, v, o, lse, do, dlse, plan, scale, group), None, None, None)


# plans of the masks in use, per mask object (masks are immutable values; a plan holds no reference to its mask)
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def ring_plan(mask, q, k, group=None, *, chunks=None, kv_chunks=None, causal=False) -> RingPlan:
    """The :class:`RingPlan` of a call: built once per (mask object, sharding, causal, heads) and cached.

    ``chunks=None`` shards contiguously in rank order with the local lengths (gathered from all ranks).
    """
    rank, world = group_info(group)
    if chunks is None:
        lens = all_gather_ints([q.shape[2], k.shape[2]], group, q.device)
        chunks = contiguous_chunks([x[0] for x in lens])
        kv_chunks = contiguous_chunks([x[1] for x in lens]) if kv_chunks is None else kv_chunks
    kv_chunks = chunks if kv_chunks is None else kv_chunks
    key = (_freeze(chunks), _freeze(kv_chunks), bool(causal), q.shape[1], k.shape[1], rank, world)
    cacheable = isinstance(mask, (BlockSparseMask, StripeSparseMask))
    cached = _PLANS.get(mask, {}) if cacheable else {}
    if key not in cached:
        cached[key] = RingPlan(mask, chunks, kv_chunks, rank, q.shape[1], k.shape[1], causal)
        if cacheable:
            _PLANS[mask] = cached
    return cached[key]


def _freeze(chunks):
    try:
        return tuple(tuple(tuple(span) for span in own) for own in chunks)
    except TypeError:  # not a list of lists of spans: RingPlan names the problem
        return repr(chunks)


def ring_attention(q, k, v, mask=None, group=None, *, chunks=None, kv_chunks=None, causal=False, scale=None,
                   return_lse=False, plan=None):
    """Sparse ring attention over sequence shards, exact and differentiable.

    Args:
        q: ``[B, Hq, Lq_r, D]``: this rank's chunks of the queries, concatenated; k, v: ``[B, Hkv, Lk_r, D]``.
        mask: the *global* BlockSparseMask / StripeSparseMask for ``(Lq, Lk)`` (the same on every rank), or
            None (dense). Chunk borders must be multiples of its block sizes.
        group: process group (None = default).
        chunks: per rank, the ``(start, end)`` query chunks (:func:`contiguous_chunks`, :func:`zigzag_chunks`);
            None = contiguous in rank order. kv_chunks: the same for keys (default: ``chunks``).
        causal: bottom-right causal in global coordinates. scale: default ``1/sqrt(D)``.
        plan: a :class:`RingPlan` from :func:`ring_plan` (then mask/chunks/causal are unused); without it the
            plan is cached per mask object, so a mask reused across calls (a step cache's) is planned once.

    Returns:
        ``o`` ``[B, Hq, Lq_r, D]``, and float32 ``lse`` ``[B, Hq, Lq_r]`` with ``return_lse``.

    Example:
        >>> o = ring_attention(shard(q, ch[r]), shard(k, ch[r]), shard(v, ch[r]), mask, chunks=ch)  # doctest: +SKIP
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise TypeError(f"{name} must be a 4-D tensor [B, H, L_r, D], got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else list(x.shape)}.")
    if v.shape[:3] != k.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k, v must agree in batch, head dim and (k, v) length, got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}.")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if plan is None:
        plan = ring_plan(mask, q, k, group, chunks=chunks, kv_chunks=kv_chunks, causal=causal)
    elif not isinstance(plan, RingPlan):
        raise TypeError(f"plan must be a RingPlan from ring_plan(), got {type(plan).__name__}.")
    want_q = sum(b - a for a, b in plan.q_chunks[plan.rank])
    want_k = sum(b - a for a, b in plan.kv_chunks[plan.rank])
    if q.shape[2] != want_q or k.shape[2] != want_k:
        raise ValueError(f"q and k must hold this rank's {want_q} query / {want_k} key tokens of the chunks, got "
                         f"{q.shape[2]} and {k.shape[2]}.")
    if plan.heads != (q.shape[1], k.shape[1]):
        raise ValueError(f"plan was built for (Hq, Hkv) = {plan.heads}, got {(q.shape[1], k.shape[1])}.")
    o, lse = _RingAttention.apply(q, k, v, plan, scale, group)
    return (o, lse) if return_lse else o
