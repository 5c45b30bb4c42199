"""transformers: register ``"sparse_attn"`` as an attention implementation.

:func:`register` adds an entry to both ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (transformers' SDPA mask builder; without it the causal/padding
mask silently disappears). Then ``from_pretrained(..., attn_implementation="sparse_attn")``
or ``model.set_attn_implementation("sparse_attn")`` runs every attention layer through
:func:`~sparse_attn.sparse_attention`, with K/V of grouped-query attention never repeated.

Calls the sparse path does not take run transformers' own SDPA function unchanged: decode
steps (``q_len == 1``), prompts shorter than ``min_seq_len``, calls with an attention mask
(padding, chunked prefill), dropout in training, soft-capping, sliding windows, attention
sinks, position biases, cross-attention, and layers the config keeps dense.

``generate()`` rejects unknown keyword arguments, so per-call settings go through a context
variable: ``with use(config): model.generate(...)``.

Example:
    >>> from sparse_attn.integrations.transformers import register   # doctest: +SKIP
    >>> register(SparseConfig(my_pattern, min_seq_len=512))            # doctest: +SKIP
    >>> model.set_attn_implementation("sparse_attn")                   # doctest: +SKIP
"""

import contextlib
import contextvars
from collections import Counter
from typing import Dict, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..ops import sparse_attention
from .sdpa import _SCOPE, SparseConfig, _DenseWatch, as_config

_CONFIGS: Dict[str, Optional[SparseConfig]] = {}
_ACTIVE: "contextvars.ContextVar[Optional[SparseConfig]]" = contextvars.ContextVar("sparse_attn_hf", default=None)
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "position_bias", "s_aux", "sinks")

#: calls per attention implementation name: ``"sparse"`` and ``"dense:<reason>"``.
stats: Dict[str, Counter] = {}


def _dense_reason(cfg, module, query, key, value, attention_mask, dropout, kwargs):
    if attention_mask is not None:
        return "attention_mask"
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


def _make_forward(name):
    counter = stats[name] = Counter()  # fresh counts at each registration
    watch = _DenseWatch(f"transformers {name!r} (counts: sparse_attn.integrations.transformers.stats[{name!r}])",
                        "dense:")

    def sparse_attn_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
        """Attention function of ``AttentionInterface``: ``[B, Hq, Lq, D]`` in, ``([B, Lq, Hq, D], None)`` out."""
        cfg = _ACTIVE.get() or _CONFIGS.get(name)
        if cfg is None:
            raise ValueError(f"attention implementation {name!r} has no SparseConfig: pass one to "
                             f"register(config, name={name!r}) or run the model inside use(config).")
        reason = _dense_reason(cfg, module, query, key, value, attention_mask, dropout, kwargs)
        layer = getattr(module, "layer_idx", None)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        q_len = query.shape[2]
        # no mask and more keys than queries only happens for an empty static cache at prefill: the keys
        # past q_len are empty slots (transformers' SDPA path crops them too); the sparse path drops them
        crop = bool(causal) and key.shape[2] > q_len
        observe = getattr(cfg, "observe", None)
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
            scope = _SCOPE.get() or {}
            if cfg.cache is not None:
                mask = cfg.cache.get_mask(pattern, query, key, layer=layer, role=scope.get("role"),
                                          causal=bool(causal), layout=None)
                if mask is None:
                    reason = "dense step"
            else:
                mask = pattern.build(query, key, causal=bool(causal), layout=None)
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
    AttentionMaskInterface.register(name, sdpa_mask)
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
    token = _ACTIVE.set(as_config(config))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


__all__ = ["register", "unregister", "use", "stats"]
