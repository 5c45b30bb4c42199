"""Per-head pattern search (Sparse-vDiT, generalized): the cheapest adequate pattern per (layer, head).

Feed calibration calls layer by layer with :meth:`PatternSearch.observe` (only per-head error and
density sums are kept, never the activations); :meth:`PatternSearch.plan` then picks per head, among
``dense``, ``skip`` and the candidates, the option minimizing ``error + lam * density`` subject to
``error <= eps`` (dense, error 0, is always admissible). Error and density are those of
:func:`~sparse_attn.attention_quality` (relative output error, computed / visible pairs), averaged over
batch and calls. The :class:`SearchPlan` saves to and loads from JSON; ``plan.pattern_for(layer)`` is a
:class:`~sparse_attn.patterns.PerHead` that builds the layer's mask in one piece (None where every head chose
dense: the integrations then run their dense attention). Layers are keyed by ``str(layer)``, so the ids the
integrations use (``layer_idx``, a module's index, ``(index, call)`` for a module's later SDPA calls) work as is.
To collect calibration calls from a model, with the layer ids the integrations apply the plan with, see
:func:`sparse_attn.integrations.calibrate.calibrate`.

Candidates may be any pattern: block-map ones share one kernel launch per layer, routing and stripe
patterns run as extra launches on their heads (:class:`~sparse_attn.head_groups.HeadGroupsMask`). A causal
search refuses patterns whose masks are permutations (``kmeans_routing``, ``video_chunk_select``, ...).
"""

import json
import math
from typing import Dict, Iterable, List, Optional

import torch

from ..quality import attention_quality
from .base import as_pattern, pattern_from_dict
from .combine import PerHead
from .static import Dense, Skip

PLAN_VERSION = 1


class SearchPlan:
    """Per layer, per query head: the chosen pattern and its measured error and density.

    Attributes:
        layers: ``{layer (str): [{"pattern": Pattern, "error": float, "density": float}, ...per head]}``.
        lam, eps: the search's trade-off and error bound.
    """

    def __init__(self, layers: Dict[str, List[dict]], lam: float, eps: float):
        self.layers = {str(k): list(v) for k, v in layers.items()}
        self.lam, self.eps = float(lam), float(eps)

    def pattern_for(self, layer) -> Optional[PerHead]:
        """The layer's :class:`PerHead` pattern (one entry per query head); None if every head chose dense.

        Raises:
            ValueError: ``layer`` was not calibrated (use :meth:`get` to run such layers dense instead).
        """
        key = str(layer)
        if key not in self.layers:
            raise ValueError(f"layer must be one of {sorted(self.layers)}, got {layer!r}: the plan has no entry for "
                             f"it (calibrate on inputs that reach this layer, or pass plan.get, which runs "
                             f"layers missing from the plan dense, as the config's pattern).")
        heads = self.layers[key]
        if all(h["pattern"].name == "dense" for h in heads):
            return None
        return PerHead(patterns=tuple(h["pattern"] for h in heads))

    def get(self, layer) -> Optional[PerHead]:
        """:meth:`pattern_for`, but None (dense) for a layer missing from the plan.

        Opt-in: ``SparseConfig(plan.get)`` runs uncalibrated layers dense; ``SparseConfig(plan)`` raises for them.
        """
        return self.pattern_for(layer) if str(layer) in self.layers else None

    def density(self) -> float:
        """Mean measured density over every (layer, head) of the plan (1.0: all dense)."""
        rows = [c["density"] for heads in self.layers.values() for c in heads]
        return sum(rows) / len(rows) if rows else 1.0

    def names(self, layer) -> List[str]:
        """Registry names chosen for the heads of ``layer``."""
        return [h["pattern"].name for h in self.layers[str(layer)]]

    def table(self) -> List[dict]:
        """Rows ``{"layer", "head", "pattern", "error", "density"}``."""
        return [dict(layer=k, head=h, pattern=c["pattern"].name, error=c["error"], density=c["density"])
                for k, heads in self.layers.items() for h, c in enumerate(heads)]

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "lam": self.lam, "eps": self.eps,
                "layers": {k: [dict(pattern=c["pattern"].to_dict(), error=c["error"], density=c["density"])
                               for c in heads] for k, heads in self.layers.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text) -> "SearchPlan":
        """Inverse of :meth:`to_json` (also accepts the decoded dict); a corrupted plan raises ValueError or
        TypeError naming the entry that is wrong."""
        if isinstance(text, (str, bytes, bytearray)):
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"a plan must be JSON text, got text that does not parse ({e}).") from None
        else:
            d = text
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
            raise ValueError(f"a plan must be a dict with version {PLAN_VERSION}, got {str(d)[:80]!r}.")
        missing = [name for name in ("lam", "eps", "layers") if name not in d]
        if missing:
            raise ValueError(f"the plan has no {missing}; expected the keys 'version', 'lam', 'eps' and 'layers'.")
        lam, eps = _plan_number(d["lam"], "plan['lam']"), _plan_number(d["eps"], "plan['eps']")
        if not isinstance(d["layers"], dict):
            raise TypeError(f"plan['layers'] must be a dict layer -> list of per-head entries, got "
                            f"{type(d['layers']).__name__} ({str(d['layers'])[:80]!r}).")
        layers = {}
        for key, heads in d["layers"].items():
            where = f"plan['layers'][{key!r}]"
            if not isinstance(heads, list):
                raise TypeError(f"{where} must be a list of per-head entries, got {type(heads).__name__} "
                                f"({str(heads)[:80]!r}).")
            if not heads:
                raise ValueError(f"{where} must hold one entry per query head, got an empty list.")
            layers[key] = [_plan_head(c, f"{where}[{h}]") for h, c in enumerate(heads)]
        return cls(layers, lam, eps)

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path) -> "SearchPlan":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def __eq__(self, other):
        """Equal plans: the same lam, eps and, per layer and head, an equal pattern, error and density."""
        if not isinstance(other, SearchPlan):
            return NotImplemented
        return (self.lam, self.eps, self.layers) == (other.lam, other.eps, other.layers)

    __hash__ = None  # mutable (layers is a dict)

    def __repr__(self):
        return f"SearchPlan(layers={len(self.layers)}, lam={self.lam}, eps={self.eps})"


def _plan_number(value, where, upper=None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a number, got {type(value).__name__} ({value!r}).")
    if not math.isfinite(value) or value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{where} must be a finite number {bound}, got {value!r}.")
    return float(value)


def _plan_head(entry, where) -> dict:
    """One per-head entry of a saved plan: ``{"pattern": dict, "error": float, "density": float}``."""
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be a dict with 'pattern', 'error' and 'density', got {type(entry).__name__} "
                        f"({str(entry)[:80]!r}).")
    missing = [name for name in ("pattern", "error", "density") if name not in entry]
    if missing:
        raise ValueError(f"{where} has no {missing}; expected the keys 'pattern', 'error' and 'density'.")
    try:
        pattern = pattern_from_dict(entry["pattern"])
    except (TypeError, ValueError) as e:
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{where}['pattern']: {e}") from e
    return dict(pattern=pattern, error=_plan_number(entry["error"], f"{where}['error']"),
                density=_plan_number(entry["density"], f"{where}['density']", upper=1.0))


class PatternSearch:
    """Accumulates per-head quality of each option over calibration calls, then picks per head.

    Args:
        candidates: patterns of one ``block_size`` (``dense``/``skip`` use the first one's).
        lam: weight of density in ``error + lam * density``.
        eps: largest admissible error.
        include_skip: also consider ``skip`` (output 0, relative error 1: only chosen when ``eps >= 1``).
        causal: evaluate causal attention.

    Example:
        >>> from sparse_attn.patterns import SlidingWindow
        >>> s = PatternSearch([SlidingWindow(left=64, right=64)], lam=0.1, eps=0.1)
        >>> q = k = v = torch.randn(1, 2, 256, 32)
        >>> s.observe(0, q, k, v)
        >>> s.plan().names(0)[0] in ("dense", "sliding_window")
        True
    """

    def __init__(self, candidates: Iterable, *, lam: float = 0.1, eps: float = 0.05, include_skip: bool = True,
                 causal: bool = False):
        cands = [as_pattern(c, f"candidates[{i}]") for i, c in enumerate(candidates)]
        for i, c in enumerate(cands):
            if causal and c.mask_kind == "permuted":
                raise ValueError(f"candidates[{i}] is {c.name}, whose permuted masks do not support causal attention; "
                                 "expected a pattern that supports causal=True for a causal search.")
        for name, x in (("lam", lam), ("eps", eps)):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
                raise ValueError(f"{name} must be a float >= 0, got {x!r}.")
        block = cands[0].block_size if cands else 64
        self.options = [Dense(block_size=block)] + ([Skip(block_size=block)] if include_skip else []) + cands
        self.lam, self.eps, self.causal = float(lam), float(eps), bool(causal)
        self._sums: Dict[str, torch.Tensor] = {}  # layer -> float64 [n_options, 2 (error, density), Hq]
        self._calls: Dict[str, int] = {}

    @torch.no_grad()
    def observe(self, layer, q, k, v, *, scale=None):
        """Add one calibration call of ``layer`` (``q [B, Hq, L, D]``, ``k``/``v [B, Hkv, L, D]``).

        ``scale`` is the softmax scale of the call (default ``1/sqrt(D)``); nothing of q, k, v is kept.
        """
        key = str(layer)
        stats = torch.zeros(len(self.options), 2, q.shape[1], dtype=torch.float64)
        for i, opt in enumerate(self.options):
            if opt.name == "dense":
                stats[i, 1] = 1.0
                continue
            qual = attention_quality(q, k, v, opt.build(q, k, causal=self.causal), causal=self.causal, scale=scale)
            stats[i, 0] = qual["error"].mean(0).cpu()
            stats[i, 1] = qual["density"].mean(0).cpu()
        if key in self._sums and self._sums[key].shape != stats.shape:
            raise ValueError(f"layer {key!r} was observed with {self._sums[key].shape[-1]} heads, got {q.shape[1]}.")
        self._sums[key] = self._sums.get(key, 0) + stats
        self._calls[key] = self._calls.get(key, 0) + 1

    def plan(self) -> SearchPlan:
        """Per head: argmin ``error + lam * density`` over options with ``error <= eps``."""
        if not self._sums:
            raise ValueError("no calibration call observed; call observe(layer, q, k, v) first.")
        layers = {}
        for key, sums in self._sums.items():
            mean = sums / self._calls[key]  # [n_options, 2, Hq]
            err, dens = mean[:, 0], mean[:, 1]
            cost = (err + self.lam * dens).masked_fill(err > self.eps, float("inf"))
            cost[0] = torch.where(torch.isinf(cost[0]), self.lam, cost[0])  # dense is always admissible
            # ties: lower density first (stable order: dense, skip, candidates)
            best = torch.stack([torch.tensor(sorted(range(len(self.options)),
                                                    key=lambda i: (cost[i, h].item(), dens[i, h].item()))[0])
                                for h in range(cost.shape[1])])
            layers[key] = [dict(pattern=self.options[int(i)], error=float(err[i, h]), density=float(dens[i, h]))
                           for h, i in enumerate(best.tolist())]
        return SearchPlan(layers, self.lam, self.eps)


def search_plan(calls: Iterable, candidates: Iterable, *, lam: float = 0.1, eps: float = 0.05,
                include_skip: bool = True, causal: bool = False) -> SearchPlan:
    """:class:`PatternSearch` over ``calls`` (an iterable of ``(layer, q, k, v)``, consumed one at a time)."""
    search = PatternSearch(candidates, lam=lam, eps=eps, include_skip=include_skip, causal=causal)
    for layer, q, k, v in calls:
        search.observe(layer, q, k, v)
    return search.plan()
