"""transformers: register ``"sparse_attn"`` as an attention implementation.

:func:`register` adds an entry to both ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (transformers' SDPA mask builder; without it the causal/padding
mask silently disappears). Then ``from_pretrained(..., attn_implementation="sparse_attn")``
or ``model.set_attn_implementation("sparse_attn")`` runs every attention layer through
:func:`~sparse_attn.sparse_attention`, with K/V of grouped-query attention never repeated.

Padded batches (left or right padding), a chunked prefill after a KV cache and a static cache's empty
slots run sparse and exact: their attention mask is read as valid ranges per batch row
(:mod:`sparse_attn.integrations.hf_masks`), which the kernels apply as predicates, and content
patterns score only the valid tokens. Calls the sparse path does not take run transformers' own SDPA
function unchanged: decode steps (``q_len == 1``), prompts shorter than ``min_seq_len``, attention
masks that are not padding ranges (holes, packed documents, custom masks), dropout in training,
soft-capping, sliding windows, attention sinks, position biases, cross-attention, and layers the
config keeps dense.

Decode steps run sparse with a :class:`SparseDecodeConfig` (presets ``kinetics`` and ``quest``): past
``min_context`` cached keys, each step (``Lq <= 16``) selects KV-cache pages from per-page key summaries kept
per layer and attends only those (:func:`~sparse_attn.sparse_attention_with_kvcache`), with the contiguous
``[B, Hkv, L, D]`` keys of a ``DynamicCache`` or a ``StaticCache``; left-padded batches decode dense.

``generate()`` rejects unknown keyword arguments, so per-call settings go through a context
variable: ``with use(config): model.generate(...)``.

``torch.compile(model, fullgraph=True)`` traces a patched model in one graph once the masks are
built (a :class:`~sparse_attn.cache.StepCache` at a reuse step); building a mask cannot be traced.
See docs/integrations.md (transformers, torch.compile) for what compiled code sees.

Example:
    >>> from sparse_attn.integrations.transformers import register   # doctest: +SKIP
    >>> register(SparseConfig(my_pattern, min_seq_len=512))            # doctest: +SKIP
    >>> model.set_attn_implementation("sparse_attn")                   # doctest: +SKIP
"""

import contextlib
import contextvars
import dataclasses
from collections import Counter
from typing import Any, Dict, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ..decode import MAX_QUERIES, DecodeState, sparse_attention_with_kvcache
from ..mask import BlockSparseMask
from ..ops import sparse_attention
from ..patterns import padding
from .hf_masks import padding_ranges
from .sdpa import _SCOPE, TOO_DENSE, SparseConfig, _DenseWatch, as_config, too_dense

_CONFIGS: Dict[str, Optional[SparseConfig]] = {}
_ACTIVE: "contextvars.ContextVar[Optional[SparseConfig]]" = contextvars.ContextVar("sparse_attn_hf", default=None)
# use() blocks, innermost last: what compiled code reads (torch.compile cannot trace ContextVar.get)
_USE_STACK: list = []
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "position_bias", "s_aux", "sinks")

#: calls per attention implementation name: ``"sparse"`` and ``"dense:<reason>"``.
stats: Dict[str, Counter] = {}


def _dense_reason(cfg, module, query, key, value, attention_mask, ranges, dropout, kwargs):
    if attention_mask is not None and ranges is None:
        # under torch.compile without a KV cache, transformers materializes the causal mask (it cannot rule
        # out packed sequences in position_ids without reading them): that call runs dense
        return "attention_mask (compiled, no KV cache)" if torch.compiler.is_compiling() else "attention_mask"
    if dropout and module.training:
        return "dropout"
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return name
    if getattr(module, "is_cross_attention", False) or "Cross" in type(module).__name__:
        return "cross-attention"
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1:
        return "decode"
    if q_len < cfg.min_seq_len:
        return "short"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return "dtype"
    if query.shape[-1] != key.shape[-1] or key.shape != value.shape:
        return "shapes"
    if kv_len < q_len:
        return "Lk < Lq"
    return None


@dataclasses.dataclass
class SparseDecodeConfig(SparseConfig):
    """A :class:`SparseConfig` whose decode steps past ``min_context`` cached keys attend selected pages only.

    ``pattern`` (and ``cache``, ``min_seq_len``) drive prefill as in :class:`SparseConfig` (``{}``: prefill
    dense). Calls with ``Lq <= 16`` queries over a longer cache select pages with ``decode`` (a decode pattern
    of :mod:`sparse_attn.patterns.decode`, e.g. ``KineticsSelect``) from per-page key summaries kept per layer
    in ``state``, then run :func:`~sparse_attn.sparse_attention_with_kvcache`.

    Attributes:
        decode: the page selection (``select(q, summaries, cache_seqlens)``).
        min_context: decode steps over fewer cached keys run transformers' dense attention.
        page_size: tokens per page.

    Example:
        >>> from sparse_attn.patterns import KineticsSelect
        >>> cfg = SparseDecodeConfig({}, decode=KineticsSelect(k=0.125), min_context=4096)
        >>> cfg.pattern_for(0) is None, cfg.page_size
        (True, 16)
    """

    decode: Any = None
    min_context: int = 4096
    page_size: int = 16
    state: DecodeState = dataclasses.field(default_factory=DecodeState, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if not callable(getattr(self.decode, "select", None)):
            raise TypeError(f"decode must be a decode pattern with select(q, summaries, cache_seqlens), got "
                            f"{type(self.decode).__name__}.")
        for field in ("min_context", "page_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "min_context" else 1):
                raise ValueError(f"{field} must be a {'non-negative' if field == 'min_context' else 'positive'} "
                                 f"int, got {value!r}.")

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(decode=self.decode.to_dict(), min_context=self.min_context, page_size=self.page_size)
        return out

    @classmethod
    def from_dict(cls, d) -> "SparseDecodeConfig":
        from ..patterns.decode import decode_pattern_from_dict

        if not isinstance(d, dict) or "decode" not in d:
            raise ValueError(f"a SparseDecodeConfig dict needs a 'decode' entry, got {str(d)[:200]!r}.")
        d = dict(d)
        decode = decode_pattern_from_dict(d.pop("decode"))
        extra = {key: d.pop(key) for key in ("min_context", "page_size") if key in d}
        base = SparseConfig.from_dict(d)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(SparseConfig)}, decode=decode,
                   **extra)


def _decode_seqlens(query, key, attention_mask, causal):
    """``(seqlens [B] int32, longest, None)`` for a decode call the sparse path takes, else ``(None, 0, reason)``."""
    if attention_mask is None:  # a DynamicCache: every key is valid (no device sync)
        return torch.full((key.shape[0],), key.shape[2], dtype=torch.int32, device=key.device), key.shape[2], None
    ranges = padding_ranges(attention_mask, bool(causal))
    if ranges is None:
        return None, 0, "attention_mask"
    q_range, kv_range = ranges
    if bool((kv_range[:, 0] != 0).any()):
        return None, 0, "decode (left padding)"
    seqlens = kv_range[:, 1].to(torch.int32).contiguous()
    if query.shape[2] > 1:
        # the kernel's diagonal is each row's own length: every query row valid, the keys aligned at their end
        q_len = query.shape[2]
        aligned = bool((seqlens == key.shape[2]).all()) if q_range is None else bool(
            ((q_range[:, 0] == 0) & (q_range[:, 1] == q_len)).all())
        if not aligned:
            return None, 0, "decode (Lq > 1, rows not aligned)"
    return seqlens, int(seqlens.max()), None


def _sparse_decode(cfg, layer, module, query, key, value, attention_mask, dropout, scaling, causal, kwargs):
    """``(out [B, Hq, Lq, D] | None, reason)``: a decode step over selected pages, or why it stays dense."""
    if dropout and module.training:
        return None, "dropout"
    for kw in _UNSUPPORTED_KWARGS:
        if kwargs.get(kw) is not None:
            return None, kw
    if getattr(module, "is_cross_attention", False) or "Cross" in type(module).__name__:
        return None, "cross-attention"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or key.shape != value.shape:
        return None, "dtype"
    seqlens, longest, reason = _decode_seqlens(query, key, attention_mask, causal)
    if reason is not None:
        return None, reason
    if longest < cfg.min_context:
        return None, "decode (short context)"
    rank = getattr(cfg.decode, "sketch_rank", lambda dim: None)(key.shape[-1])
    summaries = cfg.state.summaries(layer, key, seqlens, cfg.page_size, rank=rank,
                                    stats=getattr(cfg.decode, "page_stats", True))
    pages = cfg.decode.select(query, summaries, seqlens, k_cache=key)
    unit = getattr(cfg.decode, "unit", lambda size: size)(cfg.page_size)  # tokens per listed entry
    out = sparse_attention_with_kvcache(query, key, value, seqlens, pages=pages, page_size=unit,
                                        causal=bool(causal), scale=scaling, backend=cfg.backend,
                                        check_pages=False)  # the selection's own lists: sorted, in range
    return out, None


def prefill(model, ids):
    """``(last logits [B, V], cache)`` of a prefill of ``ids`` (to share one prefill between decode runs)."""
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.cache


def decode_perplexity(model, ids, prefix: int, prefilled=None) -> float:
    """Teacher-forced perplexity of ``ids [B, N]`` past ``prefix``: a prefill of ``ids[:, :prefix]``, then one
    decode step per token (each step attends the cache as the model's attention implementation decides), each
    step's logits scored against the next token. ``prefilled``: :func:`prefill` of ``ids[:, :prefix]`` done
    before (its cache is copied, not consumed)."""
    import copy

    if not 0 < prefix < ids.shape[1]:
        raise ValueError(f"prefix must be in (0, {ids.shape[1]}), got {prefix}.")
    last, cache = prefill(model, ids[:, :prefix]) if prefilled is None else (prefilled[0], copy.deepcopy(prefilled[1]))
    logits = [last]
    with torch.no_grad():
        for t in range(prefix, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[:, -1].float())
    nll = torch.nn.functional.cross_entropy(torch.stack(logits, 1).flatten(0, 1), ids[:, prefix:].flatten())
    return float(torch.exp(nll))


def _config(name) -> Optional[SparseConfig]:
    """The config of a call: the innermost :func:`use`, else the registered one. Eager code reads the context
    variable (per thread / task); code traced by torch.compile reads the process-wide stack of :func:`use`
    blocks instead, since Dynamo cannot trace ``ContextVar.get`` (guards recompile when either changes)."""
    if torch.compiler.is_compiling():
        return _USE_STACK[-1] if _USE_STACK else _CONFIGS.get(name)
    return _ACTIVE.get() or _CONFIGS.get(name)


def _make_forward(name):
    counter = stats[name] = Counter()  # fresh counts at each registration
    watch = _DenseWatch(f"transformers {name!r} (counts: sparse_attn.integrations.transformers.stats[{name!r}])",
                        "dense:")

    def sparse_attn_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
        """Attention function of ``AttentionInterface``: ``[B, Hq, Lq, D]`` in, ``([B, Lq, Hq, D], None)`` out."""
        cfg = _config(name)
        if cfg is None:
            raise ValueError(f"attention implementation {name!r} has no SparseConfig: pass one to "
                             f"register(config, name={name!r}) or run the model inside use(config).")
        layer = getattr(module, "layer_idx", None)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if getattr(cfg, "decode", None) is not None and not torch.compiler.is_compiling():
            if query.shape[2] <= MAX_QUERIES and key.shape[2] > query.shape[2]:  # a decode step over a cache
                out, reason = _sparse_decode(cfg, layer, module, query, key, value, attention_mask, dropout,
                                             scaling, causal, kwargs)
                if out is not None:
                    counter["sparse:decode"] += 1
                    watch.done = True
                    return out.transpose(1, 2).contiguous(), None
                cfg.state.reset(layer)
                counter["dense:" + reason] += 1
                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, is_causal=is_causal, **kwargs)
            # a prefill (a new sequence, or a new chunk): the next sparse decode step summarizes the cache afresh
            cfg.state.reset(layer)
            if getattr(cfg.decode, "sketch_rank", lambda dim: None)(key.shape[-1]) is not None:
                # the sketch is fitted to these queries; a new sequence (no cached keys before, or an empty
                # static cache: no mask) starts the moment over, a later chunk adds to it
                fresh = key.shape[2] == query.shape[2] or attention_mask is None
                cfg.state.observe_queries(layer, query, key.shape[1], fresh=fresh)
        # a padded batch, a chunked prefill after a cache or a static cache's empty slots: the mask is exactly
        # valid ranges (+ causal) per batch row, which the kernels apply as predicates
        ranges = None
        if attention_mask is not None and not torch.compiler.is_compiling():
            ranges = padding_ranges(attention_mask, bool(causal))
        reason = _dense_reason(cfg, module, query, key, value, attention_mask, ranges, dropout, kwargs)
        q_len = query.shape[2]
        # no mask and more keys than queries only happens for an empty static cache at prefill: the keys
        # past q_len are empty slots (transformers' SDPA path crops them too); the sparse path drops them
        crop = bool(causal) and key.shape[2] > q_len and attention_mask is None
        observe = getattr(cfg, "observe", None)
        if reason is None and observe is not None and ranges is not None:
            reason = "calibration (padded batch)"
        if reason is None and observe is not None:  # calibration (CalibrationConfig): observe, then run dense
            observe(layer, query, key[:, :, :q_len] if crop else key, value[:, :, :q_len] if crop else value,
                    causal=bool(causal), scale=scaling)
            reason = "calibration"
        pattern = None
        if reason is None:
            pattern = cfg.pattern_for(layer)
            if pattern is None:
                reason = "dense layer"
        if reason is None and crop:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        mask = None
        if reason is None:
            # roles come from an enclosing patch_sdpa scope; compiled code cannot read it (a ContextVar)
            scope = {} if torch.compiler.is_compiling() else (_SCOPE.get() or {})
            with padding(*ranges) if ranges is not None else contextlib.nullcontext():  # no budget on padding
                if cfg.cache is not None:
                    mask = cfg.cache.get_mask(pattern, query, key, layer=layer, role=scope.get("role"),
                                              causal=bool(causal), layout=None)
                    if mask is None:
                        reason = "dense step"
                else:
                    mask = pattern.build(query, key, causal=bool(causal), layout=None)
            if mask is not None and too_dense(cfg, mask, causal):
                reason, mask = TOO_DENSE, None
            if mask is not None and ranges is not None:
                if isinstance(mask, BlockSparseMask):
                    mask = mask.with_predicates(q_range=ranges[0], kv_range=ranges[1])
                else:
                    reason, mask = f"padded batch ({type(mask).__name__} takes no ranges)", None
        if reason is not None:
            counter["dense:" + reason] += 1
            watch.dense_call(counter, cfg)
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        counter["sparse"] += 1
        watch.sparse_call(mask, causal, counter, cfg)
        out = sparse_attention(query, key, value, mask, causal=bool(causal), scale=scaling, backend=cfg.backend)
        return out.transpose(1, 2).contiguous(), None

    sparse_attn_forward.__name__ = f"sparse_attn_forward_{name}"
    return sparse_attn_forward


def _mask_builder(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                  attention_mask=None, local_size=None, allow_is_causal_skip=True, **kwargs):
    """transformers' ``sdpa_mask``; while torch.compile traces, it also returns None (no mask: plain causal
    attention) where eager ``sdpa_mask`` does for a call without a padding mask, so that compiled prefill
    runs sparse too. (``sdpa_mask`` never skips under torch.compile before torch 2.14: it would hand every
    compiled call a materialized causal mask, which the sparse path must treat as an arbitrary mask.)"""
    if (torch.compiler.is_compiling() and allow_is_causal_skip and attention_mask is None and local_size is None
            and mask_function is causal_mask_function and not isinstance(q_offset, torch.Tensor)
            and (q_length == 1 or q_length == kv_length)):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def register(config=None, name: str = "sparse_attn") -> str:
    """Register attention implementation ``name`` in ``AttentionInterface`` and ``AttentionMaskInterface``.

    Args:
        config: default :class:`~sparse_attn.integrations.sdpa.SparseConfig` (or a pattern /
            mapping ``layer_idx -> pattern`` / plan) for models using ``name``; None leaves
            it to :func:`use`. Registering the same name again replaces the config.
        name: the ``attn_implementation`` string.

    Returns:
        ``name``.
    """
    if not isinstance(name, str) or not name or name in ("sdpa", "eager") or name.startswith("flash"):
        raise ValueError(f"name must be a new attention implementation name, got {name!r}.")
    _CONFIGS[name] = None if config is None else as_config(config)
    AttentionInterface.register(name, _make_forward(name))
    AttentionMaskInterface.register(name, _mask_builder)
    return name


def unregister(name: str = "sparse_attn"):
    """Remove ``name`` from both interfaces (models still set to it fail at their next forward)."""
    if name not in _CONFIGS:
        raise ValueError(f"{name!r} was not registered by sparse_attn; registered: {sorted(_CONFIGS)}.")
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    del _CONFIGS[name]


@contextlib.contextmanager
def use(config):
    """Run the ``with`` block with ``config`` for every registered sparse implementation."""
    config = as_config(config)
    token = _ACTIVE.set(config)
    _USE_STACK.append(config)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        _USE_STACK.pop()


__all__ = ["register", "unregister", "use", "stats", "SparseDecodeConfig", "decode_perplexity", "prefill"]
