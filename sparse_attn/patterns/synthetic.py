"""Inputs with planted attention structure, and the pattern quality table of docs/patterns.md.

Structures (logits are ``sharpness * cos(q_i, k_j)`` plus planted terms):

* ``local``: q = k = a smooth random walk (moving sum over ``width`` steps), so ``cos`` decays as a
  triangle in ``|i - j|``: a diagonal band.
* ``sink_local``: ``local`` plus sink columns (the first ``sink`` keys carry a direction every query shares).
* ``columns``: global key columns (first 4 tokens and every 512th) on top of diffuse attention.
* ``video``: a :class:`~sparse_attn.TokenLayout` video grid with text before it; tokens are a 3-D smooth
  random field (short spatial, longer temporal correlation): frame-periodic diagonals and 3-D locality;
  text keys are global columns.
* ``clusters``: contiguous segments (128-512 tokens) each drawn from one of ``topics`` (default 64) topics;
  tokens attend to every segment of their topic anywhere in the sequence.
* ``mixed``: one of the above per head (sink_local, clusters, local, columns, repeating).
"""

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..layout import TokenLayout
from ..quality import attention_quality

STRUCTURES = ("local", "sink_local", "columns", "video", "clusters", "mixed")


@dataclass
class Planted:
    """q/k/v ``[B, H, L, D]`` with known structure, the layout (video) and the planted global columns."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    structure: str
    layout: Optional[TokenLayout] = None
    columns: tuple = ()
    causal: bool = False


def _box(z, width, dim):
    """Moving sum over ``width`` steps along ``dim`` divided by sqrt(width): unit variance, triangle correlation."""
    n = z.shape[dim] - width + 1
    cs = torch.cumsum(z, dim=dim)
    zero = torch.zeros_like(cs.narrow(dim, 0, 1))
    cs = torch.cat([zero, cs], dim=dim)
    return (cs.narrow(dim, width, n) - cs.narrow(dim, 0, n)) / math.sqrt(width)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def video_layout(seq_len):
    """A video layout of ``seq_len`` tokens: 16x16 (8x8 below 4096 tokens) frames, the rest text before them."""
    side = 16 if seq_len >= 4096 else 8
    tpf = side * side
    frames = (seq_len - 1) // tpf
    if frames < 1:
        raise ValueError(f"seq_len must be > {tpf} for a video layout, got {seq_len}.")
    return TokenLayout.video(frames, side, side, text_len=seq_len - frames * tpf)


def _directions(structure, seq_len, dim, gen, layout, topics=64):
    """Unit vectors ``[L, dim]`` (q, k) and planted extra logits as (q_extra, k_extra) dims."""
    if structure in ("local", "sink_local"):
        width = 32
        x = _unit(_box(torch.randn(seq_len + width - 1, dim, generator=gen), width, 0))
        return x, x.clone()
    if structure == "columns":
        x = _unit(torch.randn(seq_len, dim, generator=gen))
        return x, _unit(torch.randn(seq_len, dim, generator=gen))
    if structure == "video":
        wt, ws = 4, 3
        f, hh, ww = layout.frames, layout.height, layout.width
        z = torch.randn(f + wt - 1, hh + ws - 1, ww + ws - 1, dim, generator=gen)
        field = _box(_box(_box(z, wt, 0), ws, 1), ws, 2).reshape(-1, dim)  # [F*H*W, dim]
        text = torch.randn(layout.text_len, dim, generator=gen)
        x = torch.empty(seq_len, dim)
        vs, ts = layout.video_start, layout.text_start
        x[vs: vs + layout.video_len] = field
        x[ts: ts + layout.text_len] = text
        x = _unit(x)
        return x, x.clone()
    if structure == "clusters":
        n_topics = topics
        topics = _unit(torch.randn(n_topics, dim, generator=gen))
        lengths, total = [], 0
        while total < seq_len:
            n = int(torch.randint(128, 513, (1,), generator=gen))
            lengths.append(min(n, seq_len - total))
            total += lengths[-1]
        seg_topic = torch.randint(0, n_topics, (len(lengths),), generator=gen)
        topic = seg_topic.repeat_interleave(torch.tensor(lengths))
        qx = _unit(topics[topic] + 0.4 * _unit(torch.randn(seq_len, dim, generator=gen)))
        kx = _unit(topics[topic] + 0.4 * _unit(torch.randn(seq_len, dim, generator=gen)))
        return qx, kx
    raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}.")


def _head(structure, seq_len, head_dim, gen, layout, sharpness, topics=64):
    """One head's (q, k) ``[L, D]`` (logits ``scale * q.k`` with ``scale = D**-0.5``) and its global columns."""
    root = head_dim ** 0.25
    qx, kx = _directions(structure, seq_len, head_dim - 1, gen, layout, topics)
    beta = {"columns": 4.0, "clusters": 20.0}.get(structure, sharpness)
    q = torch.zeros(seq_len, head_dim)
    k = torch.zeros(seq_len, head_dim)
    q[:, 1:] = qx * math.sqrt(beta) * root
    k[:, 1:] = kx * math.sqrt(beta) * root
    columns = ()
    if structure == "sink_local":
        columns = tuple(range(4))
    elif structure == "columns":
        columns = tuple(range(4)) + tuple(range(512, seq_len, 512))
    elif structure == "video":
        columns = tuple(range(layout.text_start, layout.text_start + layout.text_len))
    if columns:  # dim 0: every query has g, the column keys have h -> extra logit g*h*scale
        boost = {"sink_local": 14.0, "columns": 12.0, "video": 8.0}[structure]
        q[:, 0] = root
        k[torch.tensor(columns), 0] = boost * root
    return q, k, columns


def planted_qkv(structure, seq_len=4096, *, heads=4, head_dim=64, batch=1, seed=0, sharpness=20.0,
                topics=64, dtype=torch.float32, device=None) -> Planted:
    """q, k, v ``[batch, heads, seq_len, head_dim]`` with a planted structure (see the module docstring).

    Example:
        >>> inp = planted_qkv("sink_local", 1024, heads=2)
        >>> inp.q.shape, inp.columns
        (torch.Size([1, 2, 1024, 64]), (0, 1, 2, 3))
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}.")
    if isinstance(topics, bool) or not isinstance(topics, int) or topics < 1:
        raise ValueError(f"topics must be a positive int, got {topics!r}.")
    gen = torch.Generator().manual_seed(seed)
    layout = video_layout(seq_len) if structure == "video" else None
    per_head = (["sink_local", "clusters", "local", "columns"] * heads)[:heads] if structure == "mixed" \
        else [structure] * heads
    qs, ks, cols = [], [], set()
    for _ in range(batch):
        qb, kb = [], []
        for s in per_head:
            q, k, c = _head(s, seq_len, head_dim, gen, layout, sharpness, topics)
            qb.append(q)
            kb.append(k)
            cols.update(c)
        qs.append(torch.stack(qb))
        ks.append(torch.stack(kb))
    v = torch.randn(batch, heads, seq_len, head_dim, generator=gen)
    to = dict(dtype=dtype, device=device)
    return Planted(torch.stack(qs).to(**to), torch.stack(ks).to(**to), v.to(**to), structure, layout,
                   tuple(sorted(cols)), causal=structure in ("local", "sink_local"))


def table_configs(seq_len, heads=4):
    """``[(pattern, structure, causal)]`` rows of :func:`pattern_table`: every registered pattern, with parameters
    chosen for <= 20% density where the pattern has a budget (``dense`` and ``skip`` are the two reference rows,
    density 1 and 0). ``heads`` sizes the ``per_head`` row (one pattern per query head of the ``mixed`` input)."""
    from .base import get_pattern
    lay = video_layout(seq_len)
    cols = tuple(range(4)) + tuple(range(512, seq_len, 512))
    structural = [
        (get_pattern("sliding_window", left=128, right=0), "local", True),
        (get_pattern("sink_local", sink=64, window=128), "sink_local", True),
        (get_pattern("anchor", sink=64, window=256), "sink_local", True),
        (get_pattern("vertical_stripes", columns=cols), "columns", False),
        (get_pattern("multi_diagonal", frames=4, width=64, layout=lay), "video", False),
        (get_pattern("window_3d", window=(4, 3, 3), layout=lay), "video", False),
    ]
    n_kb = -(-seq_len // 64)
    content = [
        get_pattern("block_topk", k=0.15),
        get_pattern("block_topp", p=0.9, estimate_block=16, min_blocks=max(1, n_kb // 12),
                    max_blocks=max(1, n_kb // 5)),
        get_pattern("exact_importance", select=0.15, block_size=64),
        get_pattern("lse_mass", sparsity=0.87, high=0.92, low=0.82),
        get_pattern("vertical_slash", vertical=max(64, seq_len // 64), slash=max(64, seq_len // 32)),
    ]
    rows = list(structural)
    for structure, causal in (("sink_local", True), ("video", False), ("clusters", False), ("mixed", False)):
        rows.extend((p, structure, causal) for p in content)
    # the mixed input's heads are sink_local, clusters, local, columns (repeating): one pattern for each
    per_head_kind = {"sink_local": get_pattern("sink_local", sink=64, window=128),
                     "clusters": get_pattern("block_topk", k=0.15),
                     "local": get_pattern("sliding_window", left=128, right=128),
                     "columns": get_pattern("vertical_stripes", columns=cols)}
    kinds = (["sink_local", "clusters", "local", "columns"] * heads)[:heads]
    n_chunks = -(-seq_len // 256)
    rows += [
        (get_pattern("dense"), "mixed", False),
        (get_pattern("skip"), "mixed", False),
        (get_pattern("union", patterns=(get_pattern("sink_local", sink=64, window=128),
                                        get_pattern("block_topk", k=0.1))), "sink_local", True),
        (get_pattern("per_head", patterns=tuple(per_head_kind[kind] for kind in kinds)), "mixed", False),
        (get_pattern("chunk_select", chunk_size=256, k=max(1, n_chunks // 8)), "sink_local", True),
        (get_pattern("chunk_select", chunk_size=256, k=max(1, n_chunks // 8)), "clusters", False),
        (get_pattern("kmeans_routing"), "clusters", False),  # permuted masks: non-causal only
        (get_pattern("equal_size_routing"), "clusters", False),
        (get_pattern("region_routing", topk=4), "video", False),
        (get_pattern("video_chunk_select"), "video", False),
        (get_pattern("dhsa"), "clusters", False),  # budget 0.15 of the keys
        (get_pattern("dhsa"), "sink_local", True),
        # untrained (the seeded JL sketch); whole tiles, which the block kernels skip
        (get_pattern("sparsifiner", budget=0.15, granularity="tile"), "video", False),
        (get_pattern("hip"), "sink_local", True),
        (get_pattern("hip", mask_k=0.1), "clusters", False),
        (get_pattern("xattention", threshold=0.9), "sink_local", True),
        (get_pattern("xattention", threshold=0.85, estimate="lattice"), "clusters", False),
    ]
    return rows


def pattern_table(seq_len=8192, names=None, *, heads=4, head_dim=64, seed=0) -> list:
    """Quality of every registered pattern family on planted inputs.

    Args:
        seq_len: tokens (Lq = Lk).
        names: registry names to include (default: all rows).
        heads, head_dim, seed: input shape and seed.

    Returns:
        list of dicts ``{pattern, config, structure, causal, recall, recall_min, error, density, build_ms}``
        (recall/error/density are means over heads; build_ms is the mask build time on this device).
    """
    if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
        raise TypeError(f"names must be a sequence of pattern names or None, got {names!r}.")
    rows, cache = [], {}
    for pat, structure, causal in table_configs(seq_len, heads):
        if names is not None and pat.name not in names:
            continue
        if structure not in cache:
            cache[structure] = planted_qkv(structure, seq_len, heads=heads, head_dim=head_dim, seed=seed)
        inp = cache[structure]
        t0 = time.perf_counter()
        mask = pat.build(inp.q, inp.k, causal=causal, layout=inp.layout)
        build_ms = (time.perf_counter() - t0) * 1e3
        qual = attention_quality(inp.q, inp.k, inp.v, mask, causal=causal)
        cfg = {k: v for k, v in pat.to_dict().items() if k not in ("name", "layout")}
        rows.append({"pattern": pat.name, "config": cfg, "structure": structure, "causal": causal,
                     "recall": qual["recall_mean"], "recall_min": qual["recall_min"], "error": qual["error_mean"],
                     "density": qual["density_mean"], "build_ms": build_ms})
    return rows


def build_cost_table(seq_len=8192, *, heads=4, head_dim=64, repeats=3, seed=0) -> list:
    """Mask-building time of each content-based pattern of :func:`table_configs` vs one dense attention
    (``torch.nn.functional.scaled_dot_product_attention``) on the same ``clusters`` input, best of ``repeats``.

    Returns:
        list of dicts ``{pattern, build_ms, dense_ms, ratio}`` (non-causal).
    """
    inp = planted_qkv("clusters", seq_len, heads=heads, head_dim=head_dim, seed=seed)

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return min(times)

    dense_ms = best(lambda: torch.nn.functional.scaled_dot_product_attention(inp.q, inp.k, inp.v))
    rows, seen = [], set()
    for pat, _, _ in table_configs(seq_len, heads):
        if pat.structural or pat.name in seen:
            continue
        seen.add(pat.name)
        ms = best(lambda: pat.build(inp.q, inp.k))
        rows.append({"pattern": pat.name, "build_ms": ms, "dense_ms": dense_ms, "ratio": ms / dense_ms})
    return rows
