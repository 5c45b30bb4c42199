"""Calibration: feed a model's attention calls to a pattern search, with the layer ids the plan is applied with.

:func:`calibrate` returns a :class:`CalibrationConfig`, a
:class:`~sparse_attn.integrations.sdpa.SparseConfig` that every integration accepts in place of its
config: :func:`~sparse_attn.integrations.sdpa.patch_sdpa`, ``transformers.register`` / ``use``,
``diffusers.apply`` and ``dllm.session``. Each call that the sparse path would take (the same
checks: ``min_seq_len``, decode, masks, dropout, scoping) is handed to
``search.observe(layer, q, k, v, scale=...)`` with exactly what the integration would later pass to
``config.pattern_for(layer)`` and ``pattern.build(q, k)``: the same layer id (``layer_idx``, the
module's index, ``(index, n)`` for a module's later SDPA calls, the call's rank when unscoped), K/V not
repeated for grouped-query attention, keys cropped as for the sparse path (top-left causal, empty cache
slots, a key-padding mask's kept prefix). The call itself then runs the integration's original dense
attention, so the model's outputs are the dense ones, and the search keeps only per-head sums (no
activations). Calibrate and apply through the same integration with the same ``min_seq_len``, scoping and
``backend``: then ``search.plan()`` has an entry for every layer the sparse path asks for.

The search's ``causal`` flag must match the calls: a causal call seen by a ``causal=False`` search (or
the reverse) raises ``ValueError``. A plan lacking a layer that the model asks for at apply time raises
``ValueError`` (:meth:`~sparse_attn.patterns.SearchPlan.pattern_for`); ``SparseConfig(plan.get)`` opts
in to running such layers dense. Cache policies (warm-up steps, dense layers) do not apply while
calibrating: every call is observed.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from sparse_attn.integrations import SparseConfig, patch_sdpa
    >>> from sparse_attn.patterns import PatternSearch, SlidingWindow
    >>> search = PatternSearch([SlidingWindow(left=64, right=0)], causal=True, eps=0.5)
    >>> q = k = v = torch.randn(1, 2, 256, 32)
    >>> with patch_sdpa(calibrate(search, min_seq_len=128)) as p:
    ...     out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # observed as layer 0, dense output
    >>> torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)), p.stats["fallback:calibration"]
    (True, 1)
    >>> plan = search.plan()
    >>> with patch_sdpa(SparseConfig(plan, min_seq_len=128)) as p:
    ...     out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # layer 0 as the plan says
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .sdpa import SparseConfig


class _NoMask:
    """Placeholder pattern of a calibration config: the integrations observe before asking for a pattern."""

    def build(self, q, k, *, causal=False, layout=None):
        raise RuntimeError("a CalibrationConfig builds no mask; its integration must call config.observe() "
                           "instead (is this integration older than sparse_attn.integrations.calibrate?).")

    def __repr__(self):
        return "calibration"


@dataclass
class CalibrationConfig(SparseConfig):
    """A :class:`~sparse_attn.integrations.sdpa.SparseConfig` that observes instead of running sparse.

    Make one with :func:`calibrate`. ``pattern`` is a placeholder; ``min_seq_len``, ``backend`` and
    ``layout`` decide, as in the config the plan will be applied with, which calls are observed.

    Attributes:
        search: a :class:`~sparse_attn.patterns.PatternSearch` (anything with
            ``observe(layer, q, k, v, *, scale)`` and a bool ``causal``).
        observed: calls observed per layer id (``Counter``), shared by copies of this config.
    """

    search: Any = None
    observed: Counter = field(default_factory=Counter, repr=False, compare=False)

    def __post_init__(self):
        if self.pattern is None:
            self.pattern = _NoMask()
        super().__post_init__()
        if not callable(getattr(self.search, "observe", None)) or not isinstance(getattr(self.search, "causal", None),
                                                                                   bool):
            raise TypeError(f"search must be a PatternSearch (observe(layer, q, k, v, *, scale) and a bool causal), "
                            f"got {type(self.search).__name__}.")
        if not isinstance(self.observed, Counter):
            raise TypeError(f"observed must be a collections.Counter, got {type(self.observed).__name__}.")

    def observe(self, layer, q, k, v, *, causal: bool, scale=None):
        """Hand one attention call to the search (called by the integrations, not by users).

        Args:
            layer: the id the integration will pass to ``pattern_for`` for this call.
            q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` as the sparse path would see them.
            causal: whether the call is causal (bottom-right aligned after the integration's cropping).
            scale: the call's softmax scale (None: ``1/sqrt(D)``).
        """
        if bool(causal) != self.search.causal:
            raise ValueError(f"layer {layer!r} runs {'causal' if causal else 'non-causal'} attention, but the search "
                             f"was made with causal={self.search.causal}; make the PatternSearch with "
                             f"causal={bool(causal)} for this model.")
        self.search.observe(layer, q.detach(), k.detach(), v.detach(), scale=scale)
        self.observed[layer] += 1


def calibrate(search, *, min_seq_len: int = 128, backend: str = "auto", layout=None) -> CalibrationConfig:
    """A config that feeds every attention call of the sparse path to ``search`` and runs it dense.

    Pass it to an integration wherever a :class:`~sparse_attn.integrations.sdpa.SparseConfig` goes, run
    calibration inputs, then apply ``search.plan()`` through the same integration
    (``SparseConfig(plan, min_seq_len=...)``, ``presets.sparse_vdit(plan)``).

    Args:
        search: a :class:`~sparse_attn.patterns.PatternSearch`; its ``causal`` must match the model's calls.
        min_seq_len, backend, layout: as in the config the plan will be applied with (they decide which calls
            take the sparse path, hence which are observed).

    Returns:
        :class:`CalibrationConfig`.

    Example:
        >>> from sparse_attn.integrations import transformers as sa_hf                # doctest: +SKIP
        >>> search = PatternSearch([SinkLocal(sink=64, window=128)], causal=True)   # doctest: +SKIP
        >>> sa_hf.register(None)  # the config comes from use()                      # doctest: +SKIP
        >>> model.set_attn_implementation("sparse_attn")                             # doctest: +SKIP
        >>> with torch.no_grad(), sa_hf.use(calibrate(search, min_seq_len=128)):      # doctest: +SKIP
        ...     model(calibration_ids)  # dense logits, every layer observed
        >>> plan = search.plan()                                                     # doctest: +SKIP
        >>> with torch.no_grad(), sa_hf.use(SparseConfig(plan, min_seq_len=128)):     # doctest: +SKIP
        ...     logits = model(ids).logits  # each layer's heads as the plan says
    """
    return CalibrationConfig(search=search, min_seq_len=min_seq_len, backend=backend, layout=layout)


__all__ = ["CalibrationConfig", "calibrate"]
