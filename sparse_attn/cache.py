"""Step cache: build sparse masks at the steps a policy names and reuse them in between.

Diffusion models (video DiTs, diffusion LMs) call attention with nearly the same pattern at
every denoising step. The :class:`StepCache` builds a mask with a pattern at the steps its
:class:`CachePolicy` names (after a dense warm-up, once, at chosen rebuild steps, or every K
steps), stores it under ``(layer, role, head_group)`` together with the shapes it was built
for, and hands it back at the other steps. This is the plan/run split of FlashInfer applied
across steps.

* **Roles** tell apart the calls of one step (classifier-free guidance runs the model for the
  conditional and the unconditional input): each role gets its own entry unless
  ``share_roles``.
* **Shapes**: an entry remembers ``q``/``k`` shapes, dtype, device, causality, layout and
  pattern; a lookup with anything else invalidates it and builds anew, so a stale mask is
  never applied to other shapes. Patterns compare by value (``==``: the frozen dataclasses of
  :mod:`sparse_attn.patterns` are equal when their configurations are), so a plan that hands
  out an equal new pattern object at every call still reuses its masks.
* **Generations**: :meth:`StepCache.reset` (called by integrations when step 0 comes again or
  the timestep goes back up) drops every entry and all warm-start state.
* **New inputs**: a mask is only reused for the inputs of one generation. While nobody drives
  the steps (no :meth:`~StepCache.set_step` or :meth:`~StepCache.observe_timestep` call yet, as
  in LLM prefill through transformers), a second lookup of the same ``(layer, role, head_group)``
  is a new input (the next prompt): the cache starts a new generation before it, so a
  content-based mask built for one prompt is never applied to another prompt of the same
  length. Once steps are driven, a second lookup within one step is another call of that step
  (reused, as the policy says).
* **Warm-start state**: a pattern with ``build_stateful(q, k, *, causal, layout, state)
  -> (mask, state)`` gets back the state it returned at its previous build of that entry
  (k-means centroids, a cached LSE); other patterns are called as ``build(q, k, causal=,
  layout=)``.
* **Memory** held by masks and state is reported (:attr:`StepCache.nbytes`) and bounded by
  ``max_bytes`` (least recently used entries are dropped first).

Example:
    >>> import torch
    >>> from sparse_attn import BlockSparseMask
    >>> class Dense:
    ...     def build(self, q, k, *, causal=False, layout=None):
    ...         return BlockSparseMask.full(q.shape[2], k.shape[2], 64, device=q.device)
    >>> cache = StepCache(CachePolicy(warmup_steps=2))
    >>> q = k = torch.randn(1, 2, 128, 32)
    >>> pattern, masks = Dense(), []
    >>> for step in range(4):
    ...     cache.set_step(step)
    ...     masks.append(cache.get_mask(pattern, q, k, layer=0))
    >>> [m is None for m in masks], cache.stats["builds"]
    ([True, True, False, False], 1)
"""

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Dict, Hashable, Optional, Tuple

import torch

from ._checks import check_positive_int

DENSE, BUILD, REUSE = "dense", "build", "reuse"


def _int_tuple(value, name):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of ints, got {type(value).__name__} ({value!r}).")
    out = []
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name}[{i}] must be an int, got {type(x).__name__} ({x!r}).")
        out.append(x)
    return tuple(out)


@dataclass(frozen=True)
class CachePolicy:
    """When a :class:`StepCache` runs dense, builds a mask, or reuses the stored one.

    Steps count from 0 within one generation. At step ``s`` of ``T``:

    * dense while ``s < max(warmup_steps, int(T * warmup_fraction))``, and on ``dense_layers``
      (negative indices count from the last layer);
    * otherwise build when the entry is missing, when a step of ``rebuild_steps`` has been
      reached since the entry was built, or when ``refresh_every > 0`` steps have passed;
    * otherwise reuse. With ``reuse=False`` every call builds (content-dependent masks on
      inputs that change every call, e.g. LLM prefill).

    Attributes:
        warmup_steps: number of leading dense steps.
        warmup_fraction: leading dense steps as a share of ``num_steps`` (needs the number of steps).
        dense_layers: layer indices that always run dense.
        rebuild_steps: steps at which masks are built again (AdaSpa: ``(10, 30)`` of 50).
        refresh_every: rebuild every K steps after a build (0: never).
        reuse: keep masks across calls at all.
        share_roles: one entry for all roles of a step (cond and uncond share a mask).

    Example:
        >>> p = CachePolicy(warmup_steps=10, rebuild_steps=(10, 30))
        >>> [p.action(s, built_step=b) for s, b in ((9, None), (10, None), (20, 10), (30, 10))]
        ['dense', 'build', 'reuse', 'build']
    """

    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    dense_layers: Tuple[int, ...] = ()
    rebuild_steps: Tuple[int, ...] = ()
    refresh_every: int = 0
    reuse: bool = True
    share_roles: bool = False

    def __post_init__(self):
        check_positive_int(self.warmup_steps, "warmup_steps", allow_zero=True)
        check_positive_int(self.refresh_every, "refresh_every", allow_zero=True)
        frac = self.warmup_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)):
            raise TypeError(f"warmup_fraction must be a float in [0, 1], got {type(frac).__name__} ({frac!r}).")
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1], got {frac}.")
        object.__setattr__(self, "dense_layers", _int_tuple(self.dense_layers, "dense_layers"))
        steps = _int_tuple(self.rebuild_steps, "rebuild_steps")
        if any(s < 0 for s in steps):
            raise ValueError(f"rebuild_steps must be >= 0, got {steps}.")
        object.__setattr__(self, "rebuild_steps", tuple(sorted(set(steps))))
        for name in ("reuse", "share_roles"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}.")

    # ---- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["dense_layers"], d["rebuild_steps"] = list(self.dense_layers), list(self.rebuild_steps)
        return d

    @classmethod
    def from_dict(cls, d) -> "CachePolicy":
        if not isinstance(d, dict):
            raise TypeError(f"policy must be a dict, got {type(d).__name__}.")
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown CachePolicy fields {sorted(unknown)}; expected some of "
                             f"{sorted(cls.__dataclass_fields__)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    # ---- decisions ------------------------------------------------------------------------
    def dense_steps(self, num_steps: Optional[int] = None) -> int:
        """Number of leading dense steps for a run of ``num_steps`` steps."""
        n = self.warmup_steps
        if self.warmup_fraction:
            if num_steps is None:
                raise ValueError("warmup_fraction needs the number of steps: pass num_steps to the cache or "
                                 "the integration, got None.")
            n = max(n, int(num_steps * self.warmup_fraction))
        return n

    def is_dense_layer(self, layer, num_layers: Optional[int] = None) -> bool:
        if not self.dense_layers or isinstance(layer, bool) or not isinstance(layer, int):
            return False
        for d in self.dense_layers:
            if d < 0:
                if num_layers is None:
                    raise ValueError(f"dense_layers={self.dense_layers} has negative indices, which need "
                                     "num_layers; pass num_layers to the cache, got None.")
                d += num_layers
            if d == layer:
                return True
        return False

    def action(self, step: int, num_steps: Optional[int] = None, built_step: Optional[int] = None,
               layer=None, num_layers: Optional[int] = None) -> str:
        """``"dense"``, ``"build"`` or ``"reuse"`` at ``step`` for an entry built at ``built_step``."""
        if step < self.dense_steps(num_steps) or self.is_dense_layer(layer, num_layers):
            return DENSE
        if not self.reuse or built_step is None or built_step > step:
            return BUILD
        if built_step == step:
            return REUSE
        if any(built_step < s <= step for s in self.rebuild_steps):
            return BUILD
        if self.refresh_every and step - built_step >= self.refresh_every:
            return BUILD
        return REUSE


def nbytes(obj, _depth=0) -> int:
    """Bytes held by the tensors inside ``obj`` (masks, tuples, dicts, dataclasses), shared storages once."""
    seen = set()

    def walk(x, depth):
        if depth > 4 or x is None:
            return 0
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.device) if x.numel() else None
            if key is None or key in seen:
                return 0
            seen.add(key)
            return x.untyped_storage().nbytes()
        if isinstance(x, dict):
            return sum(walk(v, depth + 1) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v, depth + 1) for v in x)
        if hasattr(x, "__dict__") and not isinstance(x, (type, torch.nn.Module)):
            return sum(walk(v, depth + 1) for v in vars(x).values())
        return 0

    return walk(obj, _depth)


def _same_pattern(a, b) -> bool:
    """``a`` and ``b`` are the same pattern: the same object, or equal configurations (``==``). Patterns
    without ``__eq__`` compare by identity; a comparison that fails (tensor fields) counts as different."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- e.g. "the truth value of a tensor is ambiguous": not provably equal
        return False


@dataclass
class _Entry:
    signature: tuple
    pattern: Any
    mask: Any
    built_step: int
    nbytes: int = 0


@dataclass
class _Counters:
    builds: int = 0
    reuses: int = 0
    dense: int = 0
    invalidations: int = 0
    evictions: int = 0
    resets: int = 0

    def __getitem__(self, name):
        return getattr(self, name)


class StepCache:
    """Masks keyed by ``(layer, role, head_group)``, built and reused as a :class:`CachePolicy` says.

    Integrations drive it: they call :meth:`set_step` (or :meth:`observe_timestep`) once per
    denoising step, and :meth:`get_mask` at every attention call; ``None`` from
    :meth:`get_mask` means "run dense". Without either call (LLM prefill), every repeated lookup
    of a key starts a new generation: masks are never reused across prompts.

    Args:
        policy: a :class:`CachePolicy` (default: build once, reuse forever).
        max_bytes: bound on the bytes held by masks and warm-start state (LRU eviction).
        num_steps: steps per generation, for ``warmup_fraction`` (integrations may set it later).
        num_layers: number of layers, for negative ``dense_layers``.

    Attributes:
        step, generation: where the current run is (generation counts resets).
        stats: counters ``builds``, ``reuses``, ``dense``, ``invalidations``, ``evictions``, ``resets``.
        build_log: one ``(generation, step, layer, role)`` tuple per build.
    """

    def __init__(self, policy: Optional[CachePolicy] = None, *, max_bytes: int = 1 << 30,
                 num_steps: Optional[int] = None, num_layers: Optional[int] = None):
        if policy is None:
            policy = CachePolicy()
        if not isinstance(policy, CachePolicy):
            raise TypeError(f"policy must be a CachePolicy or None, got {type(policy).__name__}.")
        self.policy = policy
        self.max_bytes = check_positive_int(max_bytes, "max_bytes")
        self.num_steps = None if num_steps is None else check_positive_int(num_steps, "num_steps")
        self.num_layers = None if num_layers is None else check_positive_int(num_layers, "num_layers")
        self._entries: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self._state: Dict[Hashable, Tuple[tuple, Any]] = {}
        self.step = 0
        self.generation = 0
        self._last_timestep = None
        self._calls_in_step = 0
        self._driven = False  # set_step / observe_timestep called: steps say which calls share masks
        self._seen = set()  # (layer, role, head_group) looked up in the current step of this generation
        self.stats = _Counters()
        self.build_log = []

    # ---- steps and generations -------------------------------------------------------------
    def reset(self, num_steps: Optional[int] = None):
        """Start a new generation: drop every mask and all warm-start state, go to step 0."""
        self._entries.clear()
        self._state.clear()
        self.step = 0
        self.generation += 1
        self._last_timestep = None
        self._calls_in_step = 0
        self._seen.clear()
        self.stats.resets += 1
        if num_steps is not None:
            self.num_steps = check_positive_int(num_steps, "num_steps")

    def set_step(self, step: int, num_steps: Optional[int] = None):
        """Enter ``step`` (0-based); calling it again with the same step stays in it (CFG calls).

        Going back (e.g. to step 0 after a run) starts a new generation; to start a new one at the
        same step (a run of one step), call :meth:`reset`.
        """
        step = check_positive_int(step, "step", allow_zero=True)
        self._driven = True
        if step < self.step:
            self.reset()
        if num_steps is not None:
            self.num_steps = check_positive_int(num_steps, "num_steps")
        if step != self.step:
            self._calls_in_step = 0
            self._seen.clear()
        self.step = step

    def observe_timestep(self, timestep, num_steps: Optional[int] = None) -> str:
        """Follow a sampler's timestep: a lower one is the next step, a higher one a new generation.

        Returns the role of this call within its step: ``"call0"`` for the first model call of a
        step, ``"call1"`` for the second (classifier-free guidance), and so on.
        """
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 0:
                raise ValueError("timestep must hold at least one value, got an empty tensor.")
            timestep = float(timestep.detach().float().max())
        elif isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}.")
        timestep = float(timestep)
        self._driven = True
        if num_steps is not None:
            self.num_steps = check_positive_int(num_steps, "num_steps")
        last = self._last_timestep
        if last is None:
            if self._started():
                self.reset(self.num_steps)
        elif timestep > last:
            self.reset(self.num_steps)
        elif timestep < last:
            self.step += 1
            self._calls_in_step = 0
            self._seen.clear()
        self._last_timestep = timestep
        role = f"call{self._calls_in_step}"
        self._calls_in_step += 1
        return role

    def _started(self) -> bool:
        return bool(self._entries) or self.step > 0 or self._calls_in_step > 0 or self._last_timestep is not None

    # ---- lookups --------------------------------------------------------------------------
    def action(self, layer, role: Optional[str] = None, head_group=None) -> str:
        """What :meth:`get_mask` would do for this key now (without building)."""
        entry = self._entries.get(self._key(layer, role, head_group))
        return self.policy.action(self.step, self.num_steps, None if entry is None else entry.built_step,
                                  layer, self.num_layers)

    def _key(self, layer, role, head_group):
        return (layer, None if self.policy.share_roles else (role or "default"), head_group)

    def get_mask(self, pattern, q, k, *, layer, role: Optional[str] = None, causal: bool = False,
                 layout=None, head_group=None):
        """The mask for this attention call, or None when the policy says dense.

        Args:
            pattern: object with ``build(q, k, *, causal, layout)`` (or ``build_stateful``).
            q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``.
            layer: layer id (int for ``dense_layers``; any hashable otherwise).
            role: which call of the step (``"cond"``/``"uncond"``, ``"call0"``...).
            causal, layout: passed to the pattern; part of the entry's signature.
            head_group: optional extra key part (patterns built per group of heads).
        """
        if not (hasattr(pattern, "build") or hasattr(pattern, "build_stateful")):
            raise TypeError(f"pattern must have a build(q, k, *, causal, layout) method, got {type(pattern).__name__}.")
        seen = (layer, role, head_group)
        if seen in self._seen and not self._driven:  # no steps: a second call of this key is a new input
            self.reset()
        self._seen.add(seen)
        key = self._key(layer, role, head_group)
        signature = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, bool(causal), layout)
        entry = self._entries.get(key)
        if entry is not None and (entry.signature != signature or not _same_pattern(entry.pattern, pattern)):
            del self._entries[key]
            entry = None
            self.stats.invalidations += 1
        action = self.policy.action(self.step, self.num_steps, None if entry is None else entry.built_step,
                                    layer, self.num_layers)
        if action == DENSE:
            self.stats.dense += 1
            return None
        if action == REUSE:
            self._entries.move_to_end(key)
            self.stats.reuses += 1
            return entry.mask
        mask = self._build(pattern, q, k, key, signature, causal, layout)
        self.stats.builds += 1
        self.build_log.append((self.generation, self.step, layer, role))
        if self.policy.reuse:
            self._entries[key] = _Entry(signature, pattern, mask, self.step, nbytes(mask))
            self._entries.move_to_end(key)
            self._bound(keep=key)
        return mask

    def _build(self, pattern, q, k, key, signature, causal, layout):
        if hasattr(pattern, "build_stateful"):
            prev = self._state.get(key)
            state = prev[1] if prev is not None and prev[0] == signature else None
            mask, state = pattern.build_stateful(q, k, causal=causal, layout=layout, state=state)
            if state is None:
                self._state.pop(key, None)
            else:
                self._state[key] = (signature, state)
            return mask
        return pattern.build(q, k, causal=causal, layout=layout)

    def state(self, layer, role: Optional[str] = None, head_group=None):
        """Warm-start state stored for a key (None if none)."""
        got = self._state.get(self._key(layer, role, head_group))
        return None if got is None else got[1]

    # ---- memory ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by stored masks and warm-start state."""
        return sum(e.nbytes for e in self._entries.values()) + sum(nbytes(s[1]) for s in self._state.values())

    def __len__(self) -> int:
        return len(self._entries)

    def _bound(self, keep):
        while self.nbytes > self.max_bytes and self._entries:
            oldest = next(iter(self._entries))
            if oldest == keep and len(self._entries) == 1:
                if self.nbytes > self.max_bytes:  # one entry alone is over the bound: do not keep it
                    del self._entries[oldest]
                    self._state.pop(oldest, None)
                    self.stats.evictions += 1
                return
            if oldest == keep:
                self._entries.move_to_end(oldest)
                continue
            del self._entries[oldest]
            self._state.pop(oldest, None)
            self.stats.evictions += 1

    def __repr__(self) -> str:
        return (f"StepCache(policy={self.policy}, generation={self.generation}, step={self.step}, "
                f"entries={len(self._entries)}, nbytes={self.nbytes}, stats={self.stats})")


__all__ = ["CachePolicy", "StepCache", "DENSE", "BUILD", "REUSE", "nbytes"]
