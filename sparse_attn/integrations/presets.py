"""Presets: named configurations that reproduce published recipes as closely as this package can.

Each preset returns a :class:`~sparse_attn.integrations.sdpa.SparseConfig` (patterns from
:mod:`sparse_attn.patterns`, a :class:`~sparse_attn.cache.StepCache` with the method's
schedule) that every integration accepts. :data:`PRESETS` says, for each, what differs from
the paper. Pattern classes are imported when a preset is made. :class:`LSEWarmStart` lives in
:mod:`.warm_start` (below :mod:`.sdpa`, which loads saved configs with it) and is re-exported here.

Example:
    >>> cfg = get_preset("adaspa", num_steps=50)
    >>> cfg.cache.policy.warmup_steps, cfg.cache.policy.rebuild_steps
    (10, (10, 30))
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from .._checks import check_positive_int
from ..cache import CachePolicy, StepCache
from .sdpa import SparseConfig
from .warm_start import LSEWarmStart


@dataclass(frozen=True)
class Preset:
    """A named recipe: ``make(**kw) -> SparseConfig``, with its source and its differences from it."""

    name: str
    target: str
    source: str
    differs: str
    make: Callable[..., SparseConfig]


def _steps_share(num_steps, share):
    return int(round(num_steps * share))


def sparsed(num_steps: int, *, skip: float = 0.2, select: float = 0.3, block_size: int = 128, gen_len: int = 0,
            short_prompt: bool = False, min_seq_len: int = 128, backend: str = "auto") -> SparseConfig:
    """SparseD for diffusion LMs: dense for ``int(T * skip) + 1`` steps, exact block importance once, reused.

    ``short_prompt`` takes the paper's short-context setting (block 32, select 0.5).
    """
    from ..patterns import ExactImportance
    from .dllm import sparsed_policy

    if short_prompt:
        select, block_size = 0.5, 32
    pattern = ExactImportance(select=select, gen_len=gen_len, block_size=block_size)
    return SparseConfig(pattern, cache=StepCache(sparsed_policy(num_steps, skip), num_steps=num_steps),
                        min_seq_len=min_seq_len, backend=backend)


def adaspa(num_steps: int = 50, *, sparsity: float = 0.8, block_size: int = 64, min_seq_len: int = 256,
           backend: str = "auto") -> SparseConfig:
    """AdaSpa for video DiTs: dense for the first 20% of steps, LSE-mass search at 20% and 60% (10, 30 of 50)."""
    from ..patterns import LSEMass

    check_positive_int(num_steps, "num_steps")
    first, second = _steps_share(num_steps, 0.2), _steps_share(num_steps, 0.6)
    policy = CachePolicy(warmup_steps=first, rebuild_steps=(first, second))
    high, low = round(min(1.0, sparsity + 0.1), 6), round(max(0.0, sparsity - 0.1), 6)  # 0.9 / 0.7 around 0.8
    pattern = LSEWarmStart(LSEMass(sparsity=sparsity, high=high, low=low, block_size=block_size))
    return SparseConfig(pattern, cache=StepCache(policy, num_steps=num_steps), min_seq_len=min_seq_len,
                        backend=backend)


def sparse_vdit(plan, *, warmup_steps: int = 0, min_seq_len: int = 256, backend: str = "auto") -> SparseConfig:
    """Sparse-vDiT: a searched per-(layer, head) table of modes, applied at every step.

    Args:
        plan: the search result: a mapping ``layer -> pattern`` (e.g. ``PerHead`` of ``Dense``, ``Skip``,
            ``SlidingWindow``, ``MultiDiagonal``, ``VerticalStripes``) or an object with ``pattern_for(layer)``.
    """
    from collections.abc import Mapping

    if not (isinstance(plan, Mapping) or hasattr(plan, "pattern_for")):
        raise TypeError(f"plan must be a mapping layer -> pattern or have pattern_for(layer), got "
                        f"{type(plan).__name__}.")
    return SparseConfig(plan, cache=StepCache(CachePolicy(warmup_steps=warmup_steps)), min_seq_len=min_seq_len,
                        backend=backend)


_ROUTING_NAMES = ("kmeans_routing", "kmeans", "routing", "svg2")


def svg2(num_steps: int = 50, *, min_seq_len: int = 256, backend: str = "auto", **pattern_kw) -> SparseConfig:
    """Sparse VideoGen 2-style routing: k-means clusters of q and k (centroids carried between builds),
    dense for the first 20% of steps, rebuilt every step after (2 k-means iterations per step)."""
    from ..patterns import get_pattern, list_patterns

    names = [n for n in _ROUTING_NAMES if n in list_patterns()]
    if not names:
        raise ValueError(f"svg2 needs a k-means routing pattern registered as one of {_ROUTING_NAMES}; "
                         f"registered patterns: {list_patterns()}.")
    pattern = get_pattern(names[0], **pattern_kw)
    policy = CachePolicy(warmup_steps=_steps_share(num_steps, 0.2), refresh_every=1)
    return SparseConfig(pattern, cache=StepCache(policy, num_steps=num_steps), min_seq_len=min_seq_len,
                        backend=backend)


def minference(*, vertical=1000, slash=6096, last_q: int = 64, block_size: int = 64, min_seq_len: int = 1024,
               backend: str = "auto") -> SparseConfig:
    """MInference vertical+slash for LLM prefill: estimated from the last 64 queries at every prefill."""
    from ..patterns import VerticalSlash

    pattern = VerticalSlash(vertical=vertical, slash=slash, last_q=last_q, block_size=block_size)
    return SparseConfig(pattern, cache=None, min_seq_len=min_seq_len, backend=backend)


def moba(*, k=8, sink: int = 64, window: int = 64, block_size: int = 64, group: Optional[str] = "softmax",
         min_seq_len: int = 1024, max_density: Optional[float] = 0.6, backend: str = "auto") -> SparseConfig:
    """MoBA-style chunk gating for LLM prefill: per query block the ``k`` key blocks with the largest
    ``mean(q_blk) . mean(k_blk)``, plus the own (causal) block, a local window and sink keys.

    ``group="softmax"``: one selection per GQA group (the query heads of a kv head), ranking blocks by the
    heads' summed softmax shares, so the group's heads share one K/V gather (:class:`~sparse_attn.patterns.BlockTopK`;
    ``group=None``: per query head, as MoBA). Chosen on the tuning text (SmolLM2-135M, essays, 4k: +2.07%
    against +1.95% per head, +2.26% for ``"mean"``, all at 0.301 of the causal pairs) for its speed: one
    SmolLM2 layer's sparse attention 0.44-0.49x instead of 0.61-0.69x of dense SDPA at 4k, prefill end to end
    x0.82 instead of x0.88. On the held-out texts it loses ~0.2-1.5 points more than per head on most:
    docs/integrations.md.

    ``max_density=0.6``: a prompt short enough that the fixed budget keeps over 60% of the work (under ~1.9k
    tokens at ``k=8``: 0.68 at 1536, 0.58 at 2048) runs dense attention, exact and faster there (SmolLM2 prefill
    on CPU, sparse -> with the limit: x1.18 -> x1.09 of dense at 1024 tokens, x1.08 -> x1.03 at 1536; the rest is
    the discarded mask's build; at 2048 the sparse path is at x1.00, and a limit of 0.5 made it x1.06)."""
    from ..patterns import BlockTopK, SinkLocal

    # whole tiles: MoBA always attends its own (causal) block, which the diagonal tiles are
    pattern = BlockTopK(k=k, block_size=block_size, group=group) | SinkLocal(
        sink=sink, window=window, block_size=block_size, exact=False)
    return SparseConfig(pattern, cache=None, min_seq_len=min_seq_len, backend=backend, max_density=max_density)


def flexprefill(*, p=0.93, sink: int = 64, window: int = 64, estimate_block: Optional[int] = None,
                block_size: int = 64, group: Optional[str] = None, min_seq_len: int = 1024,
                backend: str = "auto") -> SparseConfig:
    """FlexPrefill-style cumulative-attention selection for LLM prefill: per query block the fewest key blocks
    whose estimated attention mass reaches ``p`` (``block_topp``), plus sink keys and a local window
    (token-exact ``sink_local``), built at every prefill.

    ``p=0.93`` was chosen on the tuning text only (tests/data/english_essays.txt, SmolLM2-135M, 4k tokens:
    p 0.9 / 0.93 / 0.95 give +2.15% / +1.30% / +0.77% perplexity at 0.226 / 0.269 / 0.312 of the causal
    pairs; the largest p under 30%). Held-out texts: docs/integrations.md. ``group="mean"``: one selection per
    GQA group (:class:`~sparse_attn.patterns.BlockTopP`)."""
    from ..patterns import BlockTopP, SinkLocal

    pattern = BlockTopP(p=p, estimate_block=estimate_block, block_size=block_size, group=group) | SinkLocal(
        sink=sink, window=window, block_size=block_size)
    return SparseConfig(pattern, cache=None, min_seq_len=min_seq_len, backend=backend)


def xattention(*, threshold=0.92, stride: int = 8, estimate: str = "antidiagonal", block_size: int = 64,
               group: Optional[str] = None, min_seq_len: int = 1024, backend: str = "auto") -> SparseConfig:
    """XAttention for LLM prefill: per 64-query block the fewest tiles whose antidiagonal-estimated share of
    attention (stride-8 groups) reaches ``threshold``, plus the diagonal and sink tiles, built at every prefill.

    ``threshold=0.92`` was chosen on the tuning text only (tests/data/english_essays.txt, SmolLM2-135M, 4k
    tokens: 0.9 / 0.92 / 0.93 / 0.95 give +1.64% / +0.38% / -0.02% / -0.69% perplexity at 0.247 / 0.277 /
    0.297 / 0.346 of the causal pairs; the largest threshold under 28%, leaving room for the adaptive
    density on other text). Held-out texts: docs/integrations.md. ``group="mean"``: one selection per GQA group
    (:class:`~sparse_attn.patterns.XAttention`)."""
    from ..patterns import XAttention

    pattern = XAttention(threshold=threshold, stride=stride, estimate=estimate, block_size=block_size, group=group)
    return SparseConfig(pattern, cache=None, min_seq_len=min_seq_len, backend=backend)


def xattention_lattice(*, threshold=0.85, stride: int = 8, block_size: int = 64, group: Optional[str] = None,
                       min_seq_len: int = 1024, backend: str = "auto") -> SparseConfig:
    """XAttention's antidiagonal lattice with single pairs (this package's variant, ``estimate="lattice"``): per
    64-query block the fewest tiles whose estimated share reaches ``threshold``, each query's softmax taken over
    its sampled keys (no logit averaged before the exponential), plus the diagonal and sink tiles.

    ``threshold=0.85`` was chosen on the tuning text only (essays, 4k: 0.8 / 0.85 / 0.87 / 0.9 give +3.19% / +0.83%
    / +0.29% / -0.01% at 0.225 / 0.273 / 0.297 / 0.344; the largest under 28%). The estimate was preferred to the
    antidiagonal sums after the first held-out set and confirmed on a second one: docs/integrations.md.
    ``group="mean"`` (one selection per GQA group) is worse on the essays (+1.40% at 0.283): not the default."""
    from ..patterns import XAttention

    pattern = XAttention(threshold=threshold, stride=stride, estimate="lattice", block_size=block_size, group=group)
    return SparseConfig(pattern, cache=None, min_seq_len=min_seq_len, backend=backend)


def anchor(*, super_block: int = 2048, sink: int = 64, window: int = 256, theta: float = 12.0, pool: int = 128,
           block_size: int = 64, min_seq_len: int = 1024, backend: str = "auto") -> SparseConfig:
    """AnchorAttention for LLM prefill: each row's anchor (its max over sink + band), then per 2048-row super-block
    the keys whose pooled logit (128-row pools) comes within ``theta = 12`` (log2 units) of the pooled anchor,
    as stripe columns; a ``StripeSparseMask`` built at every prefill."""
    from ..patterns import Anchor

    pattern = Anchor(super_block=super_block, sink=sink, window=window, theta=theta, pool=pool, block_size=block_size)
    return SparseConfig(pattern, cache=None, min_seq_len=min_seq_len, backend=backend)


def dhsa(*, budget=1024, local: int = 64, sink: int = 64, block_q: int = 128, per_head: bool = False,
         threshold: float = 0.5, min_chunk: int = 32, max_chunk: int = 256, block_size: int = 64,
         min_seq_len: int = 1024, backend: str = "auto") -> SparseConfig:
    """DHSA for LLM prefill: variable-length key chunks (starts at key-cosine drops), per 128-query block the
    latest 64 keys of each row and the first 64 (sink) keys plus whole chunks by head-averaged ``q_blk . k_chunk``
    (both ``mean * sqrt(len)``) up to a 1024-token budget, token-exact, built at every prefill. Without the sink
    keys SmolLM2 loses 45% perplexity at 4k (with them 1.35%, same budget)."""
    from ..patterns import DHSA

    pattern = DHSA(budget=budget, local=local, sink=sink, boundary="similarity", threshold=threshold, min_chunk=min_chunk,
                   max_chunk=max_chunk, block_q=block_q, per_head=per_head, block_size=block_size)
    return SparseConfig(pattern, cache=None, min_seq_len=min_seq_len, backend=backend)


def hip(*, mask_k=512, block_q: int = 32, micro: int = 16, window: int = 128, sink: int = 16,
        min_seq_len: int = 1024, backend: str = "auto") -> SparseConfig:
    """HiP for LLM prefill: per 32-query block a tree search keeps ``mask_k`` keys in 16-key tiles, plus a
    128-key sliding window and sink keys, built at every prefill (the paper's ``mask_k = 512``)."""
    from ..patterns import HiP

    pattern = HiP(mask_k=mask_k, block_q=block_q, micro=micro, window=window, sink=sink)
    return SparseConfig(pattern, cache=None, min_seq_len=min_seq_len, backend=backend)


def streamingllm(*, sink: int = 128, window: int = 1024, block_size: int = 64, min_seq_len: int = 1024,
                 backend: str = "auto") -> SparseConfig:
    """StreamingLLM A-shape: attention sinks (first keys) plus a local window, at prefill."""
    from ..patterns import SinkLocal

    pattern = SinkLocal(sink=sink, window=window, block_size=block_size)
    return SparseConfig(pattern, cache=StepCache(CachePolicy()), min_seq_len=min_seq_len, backend=backend)


def _decode_config(select, prefill, page_size, min_context, min_seq_len, backend):
    from .transformers import SparseDecodeConfig

    return SparseDecodeConfig({} if prefill is None else prefill, min_seq_len=min_seq_len, backend=backend,
                              decode=select, min_context=min_context, page_size=page_size)


def kinetics(*, k=0.125, sink: int = 64, window: int = 128, group: str = "mean", rerank: float = 1.0,
             page_size: int = 16, min_context: int = 4096, prefill=None, min_seq_len: int = 1024,
             backend: str = "auto"):
    """Kinetics block top-k decoding (transformers ``generate()``): past ``min_context`` cached keys each step
    attends the ``k`` pages (of ``page_size`` tokens) with the largest ``mean_group(q) . mean(page keys)``, the
    current page, ``sink`` first tokens and a ``window`` of recent ones (``group="softmax"``: a page's score is
    the summed softmax share over the group's heads, see :class:`~sparse_attn.patterns.decode.KineticsSelect`;
    ``rerank=c``: the ``c``-times larger candidate set is re-scored from its keys). ``prefill``: a prefill pattern
    (None: dense prefill). Returns a
    :class:`~sparse_attn.integrations.transformers.SparseDecodeConfig`."""
    from ..patterns.decode import KineticsSelect

    return _decode_config(KineticsSelect(k=k, sink=sink, window=window, group=group, rerank=rerank), prefill, page_size,
                          min_context, min_seq_len, backend)


def quest(*, k=0.125, page_size: int = 16, min_context: int = 4096, prefill=None, min_seq_len: int = 1024,
          backend: str = "auto"):
    """Quest query-aware decoding: past ``min_context`` cached keys each step attends the ``k`` pages with the
    largest upper bound ``sum_d max(q_d min_d, q_d max_d)`` from per-channel key min/max (and the current page)."""
    from ..patterns.decode import QuestSelect

    return _decode_config(QuestSelect(k=k), prefill, page_size, min_context, min_seq_len, backend)


def loki(*, k=0.125, sink: int = 64, window: int = 128, rank=0.25, granularity="token", page_size: int = 16,
         min_context: int = 4096, prefill=None, min_seq_len: int = 1024, backend: str = "auto"):
    """Loki-style low-rank decoding: past ``min_context`` cached keys each step scores every key in a
    ``rank``-dimensional key subspace (fitted on the prompt's keys and queries) by its softmax share summed over
    the GQA group, and attends the best keys (as many as ``k`` pages hold), the ``sink`` first and ``window`` recent tokens
    (:class:`~sparse_attn.patterns.decode.LokiSelect`); ``granularity="page"`` attends the ``k`` pages of largest
    summed share instead (cheaper on CPU, worse perplexity: docs/decode.md)."""
    from ..patterns.decode import LokiSelect

    pattern = LokiSelect(k=k, sink=sink, window=window, rank=rank, granularity=granularity)
    return _decode_config(pattern, prefill, page_size, min_context, min_seq_len, backend)


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("sparsed", "diffusion LMs (LLaDA, Dream)", "SparseD (INV-WZQ/SparseD)",
           "the mask is built at the first sparse step from that step's q/k (SparseD keeps the softmax of its last "
           "dense step); steps count from 0", sparsed),
    Preset("adaspa", "video DiTs (HunyuanVideo, CogVideoX, Wan)", "AdaSpa, arXiv 2502.21079 sec. 4",
           "the first search runs its own LSE pass (AdaSpa takes it from that step's attention); search steps scale "
           "as 20% and 60% of num_steps; text blocks kept when the layout has text", adaspa),
    Preset("sparse_vdit", "video DiTs", "Sparse-vDiT, arXiv 2506.03065 Alg. 1",
           "needs the searched plan (per-layer, per-head modes) as input; window and column budgets are the "
           "plan's (the paper does not publish them)", sparse_vdit),
    Preset("svg2", "video DiTs", "Sparse VideoGen 2",
           "needs a registered k-means routing pattern; cluster pairs chosen by the pattern", svg2),
    Preset("minference", "LLM prefill (transformers)", "MInference vertical+slash (microsoft/MInference)",
           "one vertical+slash budget for every head (MInference searches a per-head type offline)", minference),
    Preset("moba", "LLM prefill (transformers)", "MoBA (MoonshotAI/MoBA) chunk gating",
           "gates per 64-query block with the mean query (MoBA gates each query token); adds sink keys and a "
           "local window", moba),
    Preset("flexprefill", "LLM prefill (transformers)", "FlexPrefill (Lai et al., ICLR 2025) cumulative-attention "
           "index selection", "the mass is estimated per 64-query block from pooled q/k (FlexPrefill scores the last "
           "query block against every key); no per-head switch to vertical-slash; sink keys and a local window added",
           flexprefill),
    Preset("xattention", "LLM prefill (transformers)", "XAttention (mit-han-lab/x-attention, Xu et al. ICML 2025) "
           "antidiagonal scoring", "64-token tiles (XAttention: 128); each query block's diagonal and sink tiles always "
           "kept; the key groups after a query group's own are hidden under causality; no extra softmax temperature; "
           "the threshold (0.92) was chosen on the tuning text", xattention),
    Preset("xattention_lattice", "LLM prefill (transformers)", "XAttention's antidiagonal lattice (mit-han-lab/x-attention), "
           "single pairs", "not a published recipe: the antidiagonal pairs are scored one by one (each query's softmax "
           "over its 1/8 sampled keys) instead of XAttention's mean logit per stride square; 64-token tiles; diagonal "
           "and sink tiles always kept; threshold 0.85 chosen on the tuning text", xattention_lattice),
    Preset("anchor", "LLM prefill (transformers)", "AnchorAttention (yuzhouzhang9/Anchor-Attention)",
           "the local region is a band of 256 keys per row (the reference: the super-block's triangle); the pooled "
           "anchor is the mean of the rows' anchors; the scan range includes the block before each super-block that "
           "the reference skips; on CPU stripe masks run the PyTorch reference (slower than dense attention)", anchor),
    Preset("dhsa", "LLM prefill (transformers)", "DHSA (xiongsiheng/DHSA) dynamic hierarchical sparse attention",
           "chunk boundaries from a key-cosine threshold with min/max chunk lengths (the paper's boundary predictor "
           "is not reproduced; its code uses fixed chunks); the chunk crossing the budget is cut to it; 64 sink keys "
           "added (causal LMs need them)", dhsa),
    Preset("hip", "LLM prefill (transformers)", "HiP (DeepAuto-AI/hip-attention v1_0) hierarchical pruning",
           "16-key tiles as micro blocks (HiP: 2 keys) so the block kernels run them; a child's representative is the "
           "mean of its keys (HiP: one key); 16 sink keys added", hip),
    Preset("streamingllm", "LLM prefill (transformers)", "StreamingLLM A-shape",
           "applied at prefill only (decode runs dense over the whole cache; no KV eviction)", streamingllm),
    Preset("kinetics", "LLM decoding (transformers generate)", "Kinetics block top-k (Infini-AI-Lab/Kinetics)",
           "budget k counts every kept page (the paper: top 64 + the current page, here k=65); 64 sink and 128 "
           "recent tokens kept (inside the budget); selection per kv head; decode steps below min_context cached "
           "keys and left-padded batches run dense", kinetics),
    Preset("loki", "LLM decoding (transformers generate)", "Loki low-rank keys (Singhania et al., NeurIPS 2024)",
           "the sketch is fitted per layer and kv head on the prompt's keys and queries (the rank-r form of q.k with "
           "the least expected error over them; Loki: a key PCA offline on calibration data); a key's score is its "
           "softmax share summed over the GQA group; the best keys themselves are attended (granularity='page': the pages with the largest summed share); the budget counts keys "
           "(k pages' worth), 64 sink and 128 recent tokens kept inside it",
           loki),
    Preset("quest", "LLM decoding (transformers generate)", "Quest (mit-han-lab/Quest)",
           "bound maxed over the query heads of a GQA group (one page list per kv head); the current page is "
           "always kept; decode steps below min_context cached keys run dense", quest),
)}


def list_presets() -> list:
    """Preset names, sorted."""
    return sorted(PRESETS)


def get_preset(name: str, **kw) -> SparseConfig:
    """The :class:`SparseConfig` of preset ``name`` (keyword arguments as in its maker)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}.")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {list_presets()}.")
    return PRESETS[name].make(**kw)


__all__ = ["PRESETS", "Preset", "LSEWarmStart", "get_preset", "list_presets", "adaspa", "flexprefill", "minference", "moba",
           "sparse_vdit", "sparsed", "streamingllm", "svg2", "kinetics", "loki", "quest", "anchor", "dhsa", "hip", "xattention",
           "xattention_lattice"]
