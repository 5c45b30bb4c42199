"""Diffusion language models (LLaDA, Dream): a session for generation loops that call the model once per step.

Their sampling loops call ``model(x)`` once per denoising step and the attention layers call
SDPA directly. :class:`DiffusionLMSession` (or :func:`session`) puts a forward pre-hook on the
model, so each forward is one step (layer ids restart at 0, the cache moves to the next
step), and routes SDPA calls through the scoped patch of :mod:`.sdpa`. A new generation
starts (every mask and warm-start state dropped) after ``num_steps`` forwards, when the
input shape changes, or when :meth:`DiffusionLMSession.new_generation` is called.

:func:`sparsed_policy` is SparseD's schedule: dense for the first ``int(T * skip) + 1``
steps, then the mask is built once and reused until the generation ends.

Example:
    >>> with session(model, SparseConfig(pattern, cache=StepCache(sparsed_policy(64))), num_steps=64):  # doctest: +SKIP
    ...     out = llada_generate(model, prompt, steps=64)                                               # doctest: +SKIP
"""

from typing import Optional

import torch

from .._checks import check_positive_int
from ..cache import CachePolicy, StepCache
from .sdpa import SDPAPatch, as_config


def sparsed_policy(num_steps: int, skip: float = 0.2) -> CachePolicy:
    """SparseD: dense for steps ``0 .. int(num_steps * skip)``, build once at the next step, reuse after."""
    check_positive_int(num_steps, "num_steps")
    if isinstance(skip, bool) or not isinstance(skip, (int, float)) or not 0 <= skip < 1:
        raise ValueError(f"skip must be a float in [0, 1), got {skip!r}.")
    return CachePolicy(warmup_steps=int(num_steps * skip) + 1)


class DiffusionLMSession:
    """Context manager: one model forward = one denoising step, SDPA routed to sparse attention.

    Args:
        model: the diffusion LM (``torch.nn.Module``).
        config: :class:`~sparse_attn.integrations.sdpa.SparseConfig` (or a pattern); without a
            cache one is made with the default policy (build at the first step, then reuse).
        num_steps: forwards per generation; the forward after the last starts a new generation.
        model_forward_counts_as_step: set False to drive steps yourself with :meth:`step`.
        modules, self_attention_only: scoping, as in :func:`~sparse_attn.integrations.sdpa.patch_sdpa`.

    Attributes:
        step: the step of the last forward (0-based); ``cache``, ``stats`` as in the patch.
    """

    def __init__(self, model, config, *, num_steps: Optional[int] = None, model_forward_counts_as_step: bool = True,
                 modules=None, self_attention_only: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        config = as_config(config)
        if config.cache is None:
            config = as_config(config, cache=StepCache(num_steps=num_steps))
        self.model, self.config = model, config
        self.num_steps = None if num_steps is None else check_positive_int(num_steps, "num_steps")
        if num_steps is not None:
            config.cache.num_steps = self.num_steps
        if not isinstance(model_forward_counts_as_step, bool):
            raise TypeError(f"model_forward_counts_as_step must be a bool, got {model_forward_counts_as_step!r}.")
        self._auto = model_forward_counts_as_step
        self._patch = SDPAPatch(config, model=model if modules is not None else None, modules=modules,
                                self_attention_only=self_attention_only)
        self._hook = None
        self._next_step = 0
        self._shape = None
        self.step = None

    @property
    def cache(self) -> StepCache:
        return self.config.cache

    @property
    def stats(self):
        return self._patch.stats

    def new_generation(self, num_steps: Optional[int] = None):
        """Start a new generation now: step 0 next, every cached mask and state dropped."""
        if num_steps is not None:
            self.num_steps = check_positive_int(num_steps, "num_steps")
        self.cache.reset(self.num_steps)
        self._next_step = 0
        self._shape = None

    def begin_step(self, step: Optional[int] = None):
        """Enter a step by hand (``model_forward_counts_as_step=False``, or to skip ahead)."""
        step = self._next_step if step is None else check_positive_int(step, "step", allow_zero=True)
        if step < self.cache.step:
            self.new_generation()
        self.cache.set_step(step, self.num_steps)
        self._patch.step(step)
        self.step = step
        self._next_step = step + 1

    def _pre_hook(self, module, args, kwargs):
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        if (self.num_steps is not None and self._next_step >= self.num_steps) or (
                self._shape is not None and shape != self._shape):
            self.new_generation()
        self._shape = shape
        self.begin_step()

    def __enter__(self):
        self._patch.__enter__()
        if self._auto:
            self._hook = self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        try:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
        finally:
            self._patch.__exit__(*exc)
        return False


def session(model, config, *, num_steps: Optional[int] = None, **kwargs) -> DiffusionLMSession:
    """Shorthand for :class:`DiffusionLMSession` (use it with ``with``)."""
    return DiffusionLMSession(model, config, num_steps=num_steps, **kwargs)


__all__ = ["DiffusionLMSession", "session", "sparsed_policy"]
