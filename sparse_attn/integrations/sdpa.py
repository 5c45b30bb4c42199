"""SDPA drop-in: ``sparse_sdpa`` with SDPA's signature, and ``patch_sdpa`` to route a model's SDPA calls.

:func:`patch_sdpa` pushes a scoped :class:`torch.overrides.TorchFunctionMode` that sends every
``torch.nn.functional.scaled_dot_product_attention`` call made inside the ``with`` block
(also through names imported before) to :func:`sparse_sdpa`. The active :class:`SparseConfig`
lives in a :class:`contextvars.ContextVar`, so nothing global changes and the original SDPA
is back on exit, also after an exception. What the sparse path does not handle goes to the
original SDPA unchanged (counted in :attr:`SDPAPatch.stats`): dropout, an ``attn_mask`` other than
a bool key-padding mask ``[B|1, 1, 1, Lk]`` (one contiguous run of keys per batch row: applied exactly as
a key range) or a bool mask that keeps or drops whole tiles of the pattern's block size (intersected with
the pattern's tiles), decode (``q_len == 1``), sequences shorter than ``min_seq_len``, top-left causal with
``Lq > Lk``, value head dim different from the query's, unsupported dtypes, layers or steps
that the config or the cache policy keep dense.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from sparse_attn import BlockSparseMask
    >>> class Dense:
    ...     def build(self, q, k, *, causal=False, layout=None):
    ...         return BlockSparseMask.full(q.shape[2], k.shape[2], 64, device=q.device)
    >>> q = k = v = torch.randn(1, 2, 256, 32)
    >>> with patch_sdpa(Dense()) as patch:
    ...     out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> patch.stats["sparse"], torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    (1, True)
"""

import contextlib
import contextvars
import dataclasses
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch.overrides import TorchFunctionMode

from .._checks import check_positive_int
from ..cache import StepCache
from ..mask import BlockSparseMask, ranges_from_attention_mask
from ..ops import sparse_attention
from ..patterns import padding
from .warm_start import LSEWarmStart, is_pattern

_ORIG_SDPA = torch.nn.functional.scaled_dot_product_attention
_BACKENDS = ("auto", "triton", "torch")
_ROUTE: "contextvars.ContextVar[Optional[_Route]]" = contextvars.ContextVar("sparse_attn_route", default=None)
# what the caller knows about the attention call being made: layer, role, layout
_SCOPE: "contextvars.ContextVar[Optional[dict]]" = contextvars.ContextVar("sparse_attn_scope", default=None)
# set while the original SDPA runs, so that no active mode routes that call again
_BYPASS: "contextvars.ContextVar[bool]" = contextvars.ContextVar("sparse_attn_bypass", default=False)


def _call_original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    token = _BYPASS.set(True)
    try:
        return _ORIG_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    finally:
        _BYPASS.reset(token)


@dataclass
class SparseConfig:
    """Which pattern each layer uses, how masks are cached, and when to stay dense.

    Attributes:
        pattern: one pattern for every layer (anything with ``build(q, k, *, causal, layout)``),
            a mapping ``layer -> pattern`` (missing layers and None values run dense), a callable
            ``layer -> pattern | None``, or a plan object with ``pattern_for(layer)``.
        cache: a :class:`~sparse_attn.cache.StepCache`; None builds a mask at every call.
        min_seq_len: shorter queries or keys run the original dense attention.
        max_density: a block mask whose kept tiles take more than this share of dense attention's work
            (:meth:`~sparse_attn.BlockSparseMask.tile_share`) runs the original dense attention instead (the
            sparse kernels are slower than dense there); None: never.
        backend: passed to :func:`~sparse_attn.sparse_attention`.
        layout: :class:`~sparse_attn.layout.TokenLayout` passed to patterns when its length matches.

    Example:
        >>> cfg = SparseConfig(pattern={0: None}, min_seq_len=64)
        >>> cfg.pattern_for(0) is None
        True
    """

    pattern: Any = None
    cache: Optional[StepCache] = None
    min_seq_len: int = 128
    backend: str = "auto"
    layout: Any = None
    max_density: Optional[float] = None

    def __post_init__(self):
        p = self.pattern
        if p is None:
            raise ValueError("SparseConfig needs a pattern (an object with build(q, k, *, causal, layout), a "
                             "mapping layer -> pattern, a callable or a plan with pattern_for), got None.")
        if not (is_pattern(p) or isinstance(p, Mapping) or callable(p) or hasattr(p, "pattern_for")):
            raise TypeError(f"pattern must be a pattern, a mapping, a callable or a plan, got {type(p).__name__}.")
        if isinstance(p, Mapping):
            for layer, pat in p.items():
                if pat is not None and not is_pattern(pat):
                    raise TypeError(f"pattern[{layer!r}] must be a pattern or None, got {type(pat).__name__}.")
        if self.cache is not None and not isinstance(self.cache, StepCache):
            raise TypeError(f"cache must be a StepCache or None, got {type(self.cache).__name__}.")
        check_positive_int(self.min_seq_len, "min_seq_len")
        md = self.max_density
        if md is not None and (isinstance(md, bool) or not isinstance(md, (int, float)) or not 0.0 < md <= 1.0):
            raise ValueError(f"max_density must be None or a share in (0, 1], got {md!r}.")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}.")

    def to_dict(self) -> dict:
        """JSON-ready dict: ``SparseConfig.from_dict(json.loads(json.dumps(d)))`` gives a config with the same
        dict (equal patterns, plan, cache policy, ``max_bytes``, ``num_steps``, ``num_layers``, ``min_seq_len``,
        ``max_density``, ``backend``, ``layout``) and a fresh, empty cache.

        Saves patterns with ``to_dict`` (those of :mod:`sparse_attn.patterns`, the presets' wrappers), mappings
        ``layer -> pattern`` (int, str, tuple or None layer ids) and :class:`~sparse_attn.patterns.SearchPlan`
        plans (``SparseConfig(plan)`` or ``SparseConfig(plan.get)``); other callables and plan objects raise
        TypeError.
        """
        from ..patterns.search import SearchPlan

        if getattr(self, "observe", None) is not None:
            raise TypeError(f"a {type(self).__name__} observes calibration calls and is not saved; save the plan "
                            "(search.plan().save(path)) and load it into a SparseConfig instead.")

        def enc(p):
            if p is None:
                return None
            if not callable(getattr(p, "to_dict", None)):
                raise TypeError(f"pattern {type(p).__name__} has no to_dict(); only registry patterns can be saved.")
            return p.to_dict()

        p = self.pattern
        if isinstance(p, SearchPlan):
            out = {"plan": p.to_dict()}
        elif isinstance(getattr(p, "__self__", None), SearchPlan) and getattr(p, "__name__", None) == "get":
            out = {"plan": p.__self__.to_dict(), "plan_missing_layers": "dense"}
        elif is_pattern(p):
            out = {"pattern": enc(p)}
        elif isinstance(p, Mapping):
            out = {"per_layer": {_layer_key(layer): enc(pat) for layer, pat in p.items()}}
        else:
            raise TypeError(f"only a pattern, a mapping layer -> pattern or a SearchPlan (or its .get) can be saved, "
                            f"got {type(p).__name__}.")
        cache = self.cache
        out.update(policy=None if cache is None else cache.policy.to_dict(),
                   max_bytes=None if cache is None else cache.max_bytes,
                   num_steps=None if cache is None else cache.num_steps,
                   num_layers=None if cache is None else cache.num_layers, min_seq_len=self.min_seq_len,
                   max_density=self.max_density, backend=self.backend,
                   layout=None if self.layout is None else self.layout.to_dict())
        return out

    @classmethod
    def from_dict(cls, d) -> "SparseConfig":
        """Inverse of :meth:`to_dict` (a fresh, empty cache)."""
        from ..cache import CachePolicy
        from ..layout import TokenLayout
        from ..patterns.search import SearchPlan

        kinds = ("pattern", "per_layer", "plan")
        if not isinstance(d, dict) or sum(kind in d for kind in kinds) != 1:
            raise ValueError(f"a SparseConfig dict needs exactly one of {list(kinds)}, got {str(d)[:200]!r}.")
        known = {*kinds, "plan_missing_layers", "policy", "max_bytes", "num_steps", "num_layers", "min_seq_len",
                 "max_density", "backend", "layout"}
        if set(d) - known:
            raise ValueError(f"unknown SparseConfig fields {sorted(set(d) - known)}; expected some of {sorted(known)}.")
        if "pattern" in d:
            pattern = _decode_pattern(d["pattern"])
        elif "per_layer" in d:
            if not isinstance(d["per_layer"], dict):
                raise TypeError(f"per_layer must be a dict layer -> pattern, got {type(d['per_layer']).__name__}.")
            pattern = {_layer_from_key(k): _decode_pattern(v) for k, v in d["per_layer"].items()}
        else:
            plan = SearchPlan.from_json(d["plan"])
            missing = d.get("plan_missing_layers", "raise")
            if missing not in ("raise", "dense"):
                raise ValueError(f"plan_missing_layers must be 'raise' or 'dense', got {missing!r}.")
            pattern = plan.get if missing == "dense" else plan
        cache = None
        if d.get("policy") is not None:
            cache = StepCache(CachePolicy.from_dict(d["policy"]), max_bytes=d.get("max_bytes") or (1 << 30),
                              num_steps=d.get("num_steps"), num_layers=d.get("num_layers"))
        layout = None if d.get("layout") is None else TokenLayout.from_dict(d["layout"])
        return cls(pattern, cache=cache, min_seq_len=d.get("min_seq_len", 128), backend=d.get("backend", "auto"),
                   layout=layout, max_density=d.get("max_density"))

    def pattern_for(self, layer):
        """The pattern of ``layer`` (None: dense)."""
        p = self.pattern
        if is_pattern(p):
            return p
        if isinstance(p, Mapping):
            got = p.get(layer)
        elif hasattr(p, "pattern_for"):
            got = p.pattern_for(layer)
        else:
            got = p(layer)
        if got is not None and not is_pattern(got):
            raise TypeError(f"the pattern for layer {layer!r} must have a build method, got {type(got).__name__}.")
        return got


def _layer_key(layer) -> str:
    """A layer id as a JSON object key: the JSON text of the id (``0`` -> ``"0"``, ``"blk"`` -> ``'"blk"'``,
    ``(3, 1)`` -> ``"[3, 1]"``), so ints, strings, tuples and None come back as they were."""
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if x is None or isinstance(x, (int, str)) and not isinstance(x, bool):
            return x
        raise TypeError(f"per-layer keys must be ints, strs, None or tuples of them to be saved, got {x!r}.")
    return json.dumps(plain(layer))


def _layer_from_key(key):
    """Inverse of :func:`_layer_key`; also reads the older plain keys (``"0"`` -> 0, ``"blk"`` -> ``"blk"``)."""
    try:
        value = json.loads(key)
    except ValueError:
        return int(key) if key.lstrip("-").isdigit() else key

    def tup(x):
        return tuple(tup(v) for v in x) if isinstance(x, list) else x
    if not (value is None or isinstance(value, (int, str, list)) and not isinstance(value, bool)):
        return key  # an older plain key that happens to parse as JSON ("1.5", "true")
    return tup(value)


def _decode_pattern(p):
    """A saved pattern: a registry pattern, or the presets' wrapper (``lse_warm_start``)."""
    from ..patterns import pattern_from_dict

    if p is None:
        return None
    if isinstance(p, dict) and p.get("name") == LSEWarmStart.name:
        return LSEWarmStart.from_dict(p)
    return pattern_from_dict(p)


def as_config(config, **overrides) -> SparseConfig:
    """A :class:`SparseConfig` from a config, a pattern, a mapping or a plan; keyword overrides applied."""
    if isinstance(config, SparseConfig):
        # replace() keeps the subclass (a CalibrationConfig stays one) and validates again
        return dataclasses.replace(config, **overrides) if overrides else config
    return SparseConfig(pattern=config, **overrides)


class DenseFallbackWarning(UserWarning):
    """Every attention call an integration has seen so far ran dense: nothing is sparse (see its ``stats``)."""


#: an integration warns (once) after this many calls that ran dense for reasons the config did not choose,
#: if none of its calls ran with a mask that drops pairs
WARN_AFTER_DENSE_CALLS = 8
#: a "sparse" call whose mask keeps every visible pair: it does the work of dense attention
FULL_MASK = "mask keeps every pair"
#: a mask over the config's max_density: dense attention is faster there
TOO_DENSE = "mask too dense"
# dense by the config's own choice (per-layer None, policy warm-up, calibration, scoping, max_density): never
# warned about
_CHOSEN_DENSE = frozenset({"dense layer", "dense step", "calibration", "outside the chosen modules",
                           "cross-attention", TOO_DENSE})
_DENSE_HINTS = {
    "short": "calls shorter than min_seq_len={min_seq_len} run dense (the LLM presets default to 1024): pass a "
             "smaller min_seq_len",
    "attention_mask": "calls with an attention mask (padded batches, chunked prefill) run the original attention: "
                      "run prompts one at a time or batch prompts of one length",
    "attn_mask": "calls with an attn_mask other than a key-padding prefix run the original attention",
    "decode": "decode steps (one query) always run dense; only prefill runs sparse",
    FULL_MASK: "the pattern's masks keep every visible pair (a window or a budget at least as long as the "
               "sequence, e.g. the presets' window 1024 or vertical/slash 1000/6096 on a 1-2k-token prompt): "
               "use smaller windows or budgets for sequences of this length",
}


def too_dense(config, mask, causal) -> bool:
    """True when ``config.max_density`` is set and the block ``mask``'s kept tiles take more than that share
    of dense attention's work (other mask kinds: False)."""
    limit = getattr(config, "max_density", None)
    return limit is not None and isinstance(mask, BlockSparseMask) and mask.tile_share(causal=bool(causal)) > limit


class _DenseWatch:
    """Warns once (:class:`DenseFallbackWarning`) when every call so far ran dense, with the reason counts.

    ``prefix`` is how the integration's ``stats`` name dense calls (``"fallback:"``, ``"dense:"``); ``where``
    names the integration and where its counts are. A call whose mask drops pairs ends the watch (checked with
    ``mask.density(causal)``, for the calls before it only). Skipped while torch.compile traces.
    """

    def __init__(self, where: str, prefix: str):
        self.where, self.prefix = where, prefix
        self.done, self.full_masks = False, 0

    def sparse_call(self, mask, causal, stats, config):
        if self.done or torch.compiler.is_compiling():
            return
        density = getattr(mask, "density", None)
        try:
            kept = float(density(causal=bool(causal))) if callable(density) else 0.0
        except Exception:  # noqa: BLE001 -- a mask without a usable density counts as sparse
            kept = 0.0
        if kept < 1.0:
            self.done = True  # a call really ran sparse
            return
        self.full_masks += 1
        self._check(stats, config)

    def dense_call(self, stats, config):
        if not self.done and not torch.compiler.is_compiling():
            self._check(stats, config)

    def _check(self, stats, config):
        reasons = {k[len(self.prefix):]: n for k, n in stats.items() if k.startswith(self.prefix) and n}
        if self.full_masks:
            reasons[FULL_MASK] = self.full_masks
        unchosen = sum(n for reason, n in reasons.items() if reason not in _CHOSEN_DENSE)
        if unchosen < WARN_AFTER_DENSE_CALLS:
            return
        self.done = True
        hints = "; ".join(h.format(min_seq_len=getattr(config, "min_seq_len", None)) for r, h in _DENSE_HINTS.items()
                          if r in reasons)
        hints = hints[:1].upper() + hints[1:] + ". " if hints else ""
        warnings.warn(f"sparse_attn {self.where}: all {sum(reasons.values())} attention calls so far ran dense, "
                      f"none sparse; calls per reason: {dict(sorted(reasons.items()))}. {hints}"
                      "(This warning comes once.)", DenseFallbackWarning, stacklevel=3)


class _Route:
    """State of one active patch: its config, scoping and counters."""

    def __init__(self, config: SparseConfig, scoped: bool, self_attention_only: bool, where: str = "patch_sdpa"):
        self.config = config
        self.scoped = scoped
        self.self_attention_only = self_attention_only
        self.stats = Counter()
        self.ordinal = 0  # layer id of unscoped calls: their rank within the current step
        self.role = None
        self.watch = _DenseWatch(f"{where} (counts: its .stats)", "fallback:")

    def fallback(self, reason, args):
        self.stats["fallback"] += 1
        self.stats["fallback:" + reason] += 1
        self.watch.dense_call(self.stats, self.config)
        return _call_original(*args)

    def call(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        scope = _SCOPE.get()
        if self.scoped and scope is None:
            return self.fallback("outside the chosen modules", args)
        if self.self_attention_only and isinstance(key, torch.Tensor) and query.shape[-2] != key.shape[-2]:
            return self.fallback("cross-attention", args)
        # bool masks that the kernels express exactly: key padding per batch row (a range), or a mask that keeps
        # or drops whole tiles (checked at the pattern's block size once it is known)
        kv_range, bool_mask = None, None
        if attn_mask is not None and not is_causal and _is_bool_mask(attn_mask, query, key):
            kv_range = _key_padding_ranges(attn_mask, key)
            if kv_range is None:
                bool_mask = attn_mask
            elif bool((kv_range[:, 0] == 0).all() & (kv_range[:, 1] == kv_range[0, 1]).all()):
                # the same kept prefix in every row: attention over those keys only (what a search observes)
                n_valid = int(kv_range[0, 1])
                key, value, kv_range = key[:, :, :n_valid], value[:, :, :n_valid], None
            attn_mask = None
        reason = _unsupported(self.config, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if reason is not None:
            return self.fallback(reason, args)
        if scope is not None and scope.get("layer") is not None:
            n = scope.get("calls", 0)
            scope["calls"] = n + 1
            layer = scope["layer"] if n == 0 else (scope["layer"], n)
        else:
            layer = self.ordinal
            self.ordinal += 1
        role = (scope or {}).get("role", self.role)
        q_len, kv_len = query.shape[-2], key.shape[-2]
        if is_causal and kv_len > q_len:  # SDPA's top-left causal never sees keys past q_len
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        observe = getattr(self.config, "observe", None)
        if observe is not None:  # calibration (CalibrationConfig): what pattern_for(layer) would get, run dense
            observe(layer, query, key, value, causal=bool(is_causal), scale=scale)
            return self.fallback("calibration", args)
        pattern = self.config.pattern_for(layer)
        if pattern is None:
            return self.fallback("dense layer", args)
        layout = (scope or {}).get("layout", self.config.layout)
        if layout is not None and not getattr(layout, "seq_len", None) == q_len == key.shape[-2]:
            layout = None
        cache = self.config.cache
        with padding(kv_range=kv_range) if kv_range is not None else contextlib.nullcontext():
            if cache is not None:
                mask = cache.get_mask(pattern, query, key, layer=layer, role=role, causal=bool(is_causal),
                                      layout=layout)
            else:
                mask = pattern.build(query, key, causal=bool(is_causal), layout=layout)
        if mask is None:
            return self.fallback("dense step", args)
        if too_dense(self.config, mask, is_causal):
            return self.fallback(TOO_DENSE, args)
        if kv_range is not None or bool_mask is not None:
            if not isinstance(mask, BlockSparseMask):
                return self.fallback(f"attn_mask with a {type(mask).__name__}", args)
            mask = mask.with_predicates(kv_range=kv_range) if kv_range is not None else \
                _and_tile_mask(mask, bool_mask)
            if mask is None:
                return self.fallback("attn_mask", args)
        self.stats["sparse"] += 1
        self.watch.sparse_call(mask, is_causal, self.stats, self.config)
        return sparse_attention(query, key, value, mask, causal=bool(is_causal), scale=scale,
                                backend=self.config.backend)


def _is_bool_mask(attn_mask, query, key) -> bool:
    """A bool ``attn_mask`` of rank 4, ``[B|1, H|1, Lq|1, Lk]`` (SDPA broadcasting)."""
    if not (isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool and attn_mask.dim() == 4
            and isinstance(key, torch.Tensor) and key.dim() == 4 and query.dim() == 4):
        return False
    b, h, lq, lk = attn_mask.shape
    return (b in (1, query.shape[0]) and h in (1, query.shape[1]) and lq in (1, query.shape[2])
            and lk == key.shape[2])


def _key_padding_ranges(attn_mask, key):
    """int32 ``[B|1, 2]`` when ``attn_mask [B|1, 1, 1, Lk]`` keeps one contiguous run of keys per batch row."""
    if attn_mask.shape[1:3] != (1, 1):
        return None
    try:
        rng = ranges_from_attention_mask(attn_mask.reshape(attn_mask.shape[0], key.shape[2]))
    except ValueError:
        return None
    return rng if bool((rng[:, 1] > rng[:, 0]).all()) else None


def _and_tile_mask(mask, attn_mask):
    """``mask`` restricted to a bool ``attn_mask [B|1, H|1, Lq|1, Lk]`` that keeps or drops whole tiles of the
    mask's block size (None when some tile is partly kept: not block-structured)."""
    bm, bn = mask.block_size
    q_len, kv_len = mask.seq_lens
    n_qb, n_kb = mask.num_blocks
    am = attn_mask.expand(*attn_mask.shape[:2], q_len, kv_len)
    pad = torch.nn.functional.pad(am, (0, n_kb * bn - kv_len, 0, n_qb * bm - q_len))
    valid = torch.nn.functional.pad(torch.ones(q_len, kv_len, dtype=torch.bool, device=am.device),
                                    (0, n_kb * bn - kv_len, 0, n_qb * bm - q_len))
    t = pad.view(*am.shape[:2], n_qb, bm, n_kb, bn)
    v = valid.view(n_qb, bm, n_kb, bn)
    any_ = (t & v).any(5).any(3)  # [B|1, H|1, NQB, NKB]
    all_ = (t | ~v).all(5).all(3)
    if not torch.equal(any_, all_):
        return None
    try:
        tiles = mask.to_block_dense() & any_
        full = mask.full_tiles() & any_
        shape = torch.broadcast_shapes(tiles.shape, full.shape)
    except RuntimeError:  # mask heads (per kv head) and attn_mask heads (per query head) do not broadcast
        return None
    return BlockSparseMask.from_tile_evaluator(mask.tile_tokens, tiles.expand(shape), mask.block_size,
                                               mask.seq_lens, full=full.expand(shape))


def _unsupported(config, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Why the sparse path cannot take this call (None if it can)."""
    if not all(isinstance(x, torch.Tensor) for x in (query, key, value)):
        return "non-tensor input"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "rank != 4"
    if dropout_p:
        return "dropout"
    if attn_mask is not None:
        return "attn_mask"
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (
            torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return "dtype"
    if query.dtype == torch.float64 and config.backend != "torch":
        return "dtype"
    if key.shape != value.shape or key.shape[-1] != query.shape[-1] or key.shape[0] != query.shape[0]:
        return "shapes"
    n_q, n_kv = query.shape[1], key.shape[1]
    if n_q != n_kv and not (enable_gqa and n_kv and n_q % n_kv == 0):
        return "heads"
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if q_len == 1:
        return "decode"
    if q_len < config.min_seq_len or kv_len < config.min_seq_len:
        return "short"
    if is_causal and q_len > kv_len:
        return "top-left causal with Lq > Lk"
    return None


def sparse_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` with the active sparse config.

    Same signature and semantics as SDPA (``is_causal`` top-left aligned). Inside
    :func:`patch_sdpa` the call runs sparse attention when it can; outside one, or for what the
    sparse path does not handle, it is the original SDPA.

    Args:
        query: ``[B, Hq, Lq, D]``; key, value: ``[B, Hkv, Lk, D]`` (``Hkv < Hq`` needs ``enable_gqa``).

    Returns:
        ``[B, Hq, Lq, D]``.
    """
    route = _ROUTE.get()
    if route is None:
        return _call_original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return route.call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


class _SDPAMode(TorchFunctionMode):
    """Sends SDPA calls to :func:`sparse_sdpa`; the mode is off while its handler runs (no recursion)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _ORIG_SDPA and not _BYPASS.get():
            return sparse_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def _module_selector(modules):
    if modules is None:
        return None
    if callable(modules):
        return modules
    if isinstance(modules, str):
        rx = re.compile(modules)
        return lambda name, mod: rx.fullmatch(name) is not None
    if isinstance(modules, (list, tuple, set, frozenset)):
        names = set(modules)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"modules must hold module names (str), got {bad[0]!r}.")
        return lambda name, mod: name in names
    raise TypeError(f"modules must be None, a predicate (name, module) -> bool, a regex str or a list of names, "
                    f"got {type(modules).__name__}.")


class SDPAPatch:
    """Context manager returned by :func:`patch_sdpa`.

    Attributes:
        config: the :class:`SparseConfig` in use.
        stats: counter of ``"sparse"`` calls and ``"fallback:<reason>"`` calls.
        layers: ``{module name: layer index}`` of the chosen modules (scoped patches).
    """

    def __init__(self, config, *, model=None, modules=None, self_attention_only=False):
        self.config = as_config(config)
        if not isinstance(self_attention_only, bool):
            raise TypeError(f"self_attention_only must be a bool, got {self_attention_only!r}.")
        select = _module_selector(modules)
        if select is not None and model is None:
            raise ValueError("modules needs model (the torch.nn.Module whose submodules are chosen), got None.")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model, self._select, self.self_attention_only = model, select, self_attention_only
        self.layers = {}
        self._route = None
        self._stats = Counter()
        self._hooks, self._tokens, self._mode, self._route_token = [], {}, None, None

    @property
    def stats(self) -> Counter:
        return self._route.stats if self._route is not None else self._stats

    def step(self, step: int, num_steps: Optional[int] = None):
        """Mark the start of denoising step ``step``: unscoped layer ids restart at 0, the cache follows."""
        if self.config.cache is not None:
            self.config.cache.set_step(step, num_steps)
        if self._route is not None:
            self._route.ordinal = 0

    def __enter__(self):
        if self._route is not None:
            raise RuntimeError("this SDPAPatch is already active; create a new one with patch_sdpa to nest.")
        self._route = _Route(self.config, self._select is not None, self.self_attention_only)
        if self._select is not None:
            chosen = [(n, m) for n, m in self.model.named_modules() if n and self._select(n, m)]
            if not chosen:
                raise ValueError("modules chose no submodule of model; check the predicate or names.")
            self.layers = {n: i for i, (n, _) in enumerate(chosen)}
            for name, mod in chosen:
                self._hooks.append(mod.register_forward_pre_hook(self._enter_module(name)))
                self._hooks.append(mod.register_forward_hook(self._exit_module(name), always_call=True))
        self._route_token = _ROUTE.set(self._route)
        self._mode = _SDPAMode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._mode.__exit__(*exc)
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            _ROUTE.reset(self._route_token)
            self._stats = self._route.stats
            self._route, self._mode = None, None
        return False

    def _enter_module(self, name):
        def hook(module, args):
            outer = _SCOPE.get() or {}
            scope = {"layer": self.layers[name], "name": name, "calls": 0}
            for k in ("role", "layout"):
                if k in outer:
                    scope[k] = outer[k]
            self._tokens.setdefault(name, []).append(_SCOPE.set(scope))
        return hook

    def _exit_module(self, name):
        def hook(module, args, output):
            tokens = self._tokens.get(name)
            if tokens:
                _SCOPE.reset(tokens.pop())
        return hook


def patch_sdpa(config, *, model=None, modules=None, self_attention_only=False) -> SDPAPatch:
    """Route SDPA calls made inside the ``with`` block through :func:`sparse_sdpa`.

    Args:
        config: a :class:`SparseConfig`, or a pattern / mapping / plan (wrapped with defaults).
        model: the module whose submodules ``modules`` chooses.
        modules: limit the patch to calls made inside these submodules of ``model``: a predicate
            ``(name, module) -> bool``, a regex matched against the full name, or a list of names.
            Their order gives the layer index (for per-layer patterns and ``dense_layers``).
        self_attention_only: leave calls with ``Lq != Lk`` (cross-attention) to the original SDPA.

    Returns:
        :class:`SDPAPatch` (use it with ``with``).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from sparse_attn import BlockSparseMask
        >>> class Band:
        ...     def build(self, q, k, *, causal=False, layout=None):
        ...         n = -(-q.shape[2] // 64)
        ...         keep = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= 1
        ...         return BlockSparseMask.from_dense(keep[None, None], 64, (q.shape[2], k.shape[2]))
        >>> x = torch.randn(1, 2, 512, 32)
        >>> with patch_sdpa(SparseConfig(Band(), min_seq_len=256)) as p:
        ...     y = F.scaled_dot_product_attention(x, x, x)   # sparse
        ...     z = F.scaled_dot_product_attention(x[:, :, :100], x, x)   # short: original SDPA
        >>> dict(p.stats)
        {'sparse': 1, 'fallback': 1, 'fallback:short': 1}
    """
    return SDPAPatch(config, model=model, modules=modules, self_attention_only=self_attention_only)


def original_sdpa() -> Callable:
    """The SDPA function saved when this module was imported."""
    return _ORIG_SDPA


__all__ = ["SparseConfig", "SDPAPatch", "DenseFallbackWarning", "WARN_AFTER_DENSE_CALLS", "as_config", "is_pattern", "original_sdpa", "patch_sdpa", "sparse_sdpa"]
