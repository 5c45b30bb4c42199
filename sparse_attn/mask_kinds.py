"""Mask kinds: how :func:`~sparse_attn.sparse_attention` and :func:`~sparse_attn.attention_quality` reach a
composite mask without importing it.

The elementary masks (:class:`~sparse_attn.BlockSparseMask`, :class:`~sparse_attn.StripeSparseMask`, None)
are handled by ``ops``/``stripe_ops``/``quality`` themselves. A composite mask (a permutation, token
clusters or head groups around inner masks) registers its class here, in the module that defines it, with
the two functions that run it::

    register_mask_kind(PermutedMask, attend=permuted_attention, quality=permuted_quality)

Registration happens when that module is imported, which it must be for anyone to hold such a mask. The
composite modules then call *down* into ``sparse_attention`` for their inner masks; ``ops`` and ``quality``
never import them, so imports run one way. This module imports nothing from ``sparse_attn``.
"""

from typing import Callable, NamedTuple


class MaskKind(NamedTuple):
    """What :func:`register_mask_kind` stores for one composite mask class.

    Attributes:
        attend: ``attend(q, k, v, mask, *, causal, scale, return_lse, backend)``, the
            :func:`~sparse_attn.sparse_attention` of this kind (``o``, or ``(o, lse)``).
        quality: ``quality(mask, q, k, v, *, causal, scale) -> dict``, the
            :func:`~sparse_attn.attention_quality` report of this kind (mask first, like a method).
    """

    attend: Callable
    quality: Callable


_KINDS: dict = {}


def register_mask_kind(cls, *, attend, quality):
    """Make ``sparse_attention`` and ``attention_quality`` accept instances of ``cls`` (and its subclasses).

    Args:
        cls: the composite mask class.
        attend: ``attend(q, k, v, mask, *, causal, scale, return_lse, backend)``.
        quality: ``quality(mask, q, k, v, *, causal, scale) -> dict`` (mask first, like a method).

    Returns:
        ``cls`` (so it can be used after the class definition as ``register_mask_kind(Cls, ...)``).

    Example:
        >>> class Dense:  # a toy kind: dense attention whatever the mask says
        ...     seq_lens = None
        >>> from sparse_attn import sparse_attention, attention_quality
        >>> _ = register_mask_kind(Dense, attend=lambda q, k, v, mask, **kw: sparse_attention(q, k, v, None, **kw),
        ...                        quality=lambda mask, q, k, v, **kw: attention_quality(q, k, v, None, **kw))
        >>> import torch; q = torch.randn(1, 1, 8, 16)
        >>> sparse_attention(q, q, q, Dense()).shape
        torch.Size([1, 1, 8, 16])
        >>> _ = unregister_mask_kind(Dense)
    """
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, got {type(cls).__name__} ({cls!r}).")
    for name, fn in (("attend", attend), ("quality", quality)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__} ({fn!r}).")
    _KINDS[cls] = MaskKind(attend, quality)
    return cls


def unregister_mask_kind(cls):
    """Remove ``cls``'s registration (tests and toy kinds); returns its :class:`MaskKind`.

    Raises KeyError naming the class when it was not registered.
    """
    try:
        return _KINDS.pop(cls)
    except KeyError:
        raise KeyError(f"cls {getattr(cls, '__name__', cls)!r} is not a registered mask kind.") from None


def mask_kind(mask):
    """The :class:`MaskKind` of ``mask``'s class (or of its nearest registered base class), or None for an
    elementary mask, None, or anything unregistered (the caller then checks it as an elementary mask)."""
    for cls in type(mask).__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def registered_mask_kinds():
    """The registered composite mask classes, in registration order."""
    return list(_KINDS)
