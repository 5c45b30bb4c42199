"""Pattern wrappers that the integrations save and load: :func:`is_pattern` and :class:`LSEWarmStart`.

They sit below both :mod:`.sdpa` (which reads saved configs) and :mod:`.presets` (whose AdaSpa recipe
uses the wrapper), so neither has to import the other's module to reach them.

Example:
    >>> from sparse_attn.patterns import LSEMass
    >>> pat = LSEWarmStart(LSEMass(sparsity=0.5))
    >>> is_pattern(pat), LSEWarmStart.from_dict(pat.to_dict()).pattern == pat.pattern
    (True, True)
"""

from dataclasses import dataclass
from typing import Any, ClassVar

from ..ops import sparse_attention
from ..patterns import pattern_from_dict


def is_pattern(obj) -> bool:
    """True for objects with ``build(q, k, *, causal, layout)`` (or ``build_stateful``)."""
    return callable(getattr(obj, "build", None)) or callable(getattr(obj, "build_stateful", None))


@dataclass(repr=False)
class LSEWarmStart:
    """Carries the row LSE of the first build to later builds (AdaSpa: step 30 reuses step 10's LSE).

    Wraps a pattern whose ``build`` accepts ``lse=`` (``LSEMass``, ``ExactImportance``). The first
    build computes the LSE with one dense pass (:func:`~sparse_attn.sparse_attention` with
    ``return_lse``) and keeps it as the cache's warm-start state; later builds of the same entry
    reuse it and skip that pass. Saved as ``{"name": "lse_warm_start", "pattern": {...}}``.
    """

    name: ClassVar[str] = "lse_warm_start"
    pattern: Any = None

    def __post_init__(self):
        if not is_pattern(self.pattern):
            raise TypeError(f"pattern must have a build method, got {type(self.pattern).__name__}.")

    def build(self, q, k, *, causal=False, layout=None):
        return self.build_stateful(q, k, causal=causal, layout=layout, state=None)[0]

    def build_stateful(self, q, k, *, causal=False, layout=None, state=None):
        if state is None:
            scale = getattr(self.pattern, "scale", None)
            _, state = sparse_attention(q, k, k, None, causal=bool(causal), scale=scale, return_lse=True)
        return self.pattern.build(q, k, causal=causal, layout=layout, lse=state), state

    def to_dict(self) -> dict:
        if not callable(getattr(self.pattern, "to_dict", None)):
            raise TypeError(f"pattern {type(self.pattern).__name__} has no to_dict(); only registry patterns can be "
                            "saved.")
        return {"name": self.name, "pattern": self.pattern.to_dict()}

    @classmethod
    def from_dict(cls, d) -> "LSEWarmStart":
        if not isinstance(d, dict) or d.get("name") != cls.name or set(d) != {"name", "pattern"}:
            raise ValueError(f"an LSEWarmStart dict must be {{'name': 'lse_warm_start', 'pattern': {{...}}}}, "
                             f"got {str(d)[:200]!r}.")
        return cls(pattern_from_dict(d["pattern"]))

    def __repr__(self):
        return f"LSEWarmStart({self.pattern!r})"


__all__ = ["LSEWarmStart", "is_pattern"]
