"""diffusers: sparse self-attention in transformers and pipelines, with masks cached across denoising steps.

:func:`apply` wraps the processor of every self-attention module (cross-attention is left
untouched) so that it runs the original processor (the model's own projections, norms and
RoPE) with its SDPA calls routed to :func:`~sparse_attn.sparse_attention`. That reaches both
processor families: those calling ``dispatch_attention_fn`` with the default ``native``
backend (Wan, Flux, HunyuanVideo, LTX) and those calling SDPA directly (CogVideoX, UNet).

A forward pre-hook on each transformer reads ``timestep``: a lower timestep is the next
denoising step, the same one is another call of the same step (classifier-free guidance:
roles ``"call0"``, ``"call1"``, each with its own cache entry), a higher one starts a new
generation (the cache drops everything). The hook also derives the video token layout
(:class:`~sparse_attn.layout.TokenLayout`) from the latent shape and the model config for
Wan, CogVideoX, HunyuanVideo and Flux.

Context parallelism: under diffusers' own ``ContextParallelConfig(ulysses_degree=n)`` with the native
backend, each rank's SDPA call sees the whole sequence for its heads, so the patch composes (in either
order with ``enable_parallelism``). Under ``ring_degree=n`` diffusers' ring needs an LSE the native
backend lacks, so the wrapped processor runs its attention as :func:`~sparse_attn.distributed.ring_attention`
over diffusers' ring group instead, with a mask built for the whole sequence (docs/distributed.md).

Example:
    >>> handle = apply(pipe, SparseConfig(pattern, cache=StepCache(CachePolicy(warmup_steps=10))))  # doctest: +SKIP
    >>> video = pipe(prompt_embeds=emb, num_inference_steps=50).frames                          # doctest: +SKIP
    >>> handle.remove()                                                                        # doctest: +SKIP
"""

import inspect
from typing import Callable, List, Optional

import torch

from ..layout import TokenLayout
from .sdpa import _ROUTE, _SCOPE, _Route, _SDPAMode, as_config


def _native_backend(name) -> bool:
    value = getattr(name, "value", name)
    return value is None or str(value).lstrip("_").startswith("native")


def _ring_config(proc):
    """diffusers' context-parallel config of a processor when it runs ring attention (else None)."""
    cp = getattr(getattr(proc, "_parallel_config", None), "context_parallel_config", None)
    if cp is None or getattr(cp, "ring_degree", 1) <= 1:
        return None
    if getattr(cp, "ulysses_degree", 1) > 1:
        raise ValueError(f"ring_degree={cp.ring_degree} with ulysses_degree={cp.ulysses_degree}: sparse_attn runs "
                         f"one of the two, not both (docs/distributed.md).")
    return cp


def _check_parallel(processors):
    for proc in processors.values():
        _ring_config(proc)


def _check_backends(model, processors):
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        active = _AttentionBackendRegistry.get_active_backend()[0]
    except (ImportError, AttributeError):  # older diffusers: processors call SDPA directly
        active = None
    for name, proc in processors.items():
        backend = getattr(proc, "_attention_backend", None)
        if backend is None:
            backend = active
        if not _native_backend(backend):
            raise ValueError(f"{name} uses attention backend {getattr(backend, 'value', backend)!r}; sparse_attn "
                             f"routes SDPA calls, so the backend must be 'native' (model.set_attention_backend"
                             f"('native') or unset DIFFUSERS_ATTN_BACKEND).")


def infer_layout(model, args, kwargs) -> Optional[TokenLayout]:
    """Token layout of the attention sequence from a transformer's forward inputs (None if unknown).

    Wan: ``[B, C, F, H, W]`` latents, patch ``(p_t, p_h, p_w)``, no text in self-attention.
    CogVideoX: ``[B, F, C, H, W]``, text before the video. HunyuanVideo: text after.
    Flux: image grid from ``img_ids``, text before the image. LTX: ``num_frames``/``height``/``width``.
    """
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        return None
    cls = type(model).__name__
    cfg = getattr(model, "config", {}) or {}
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    text = kwargs.get("encoder_hidden_states")
    text_len = text.shape[1] if isinstance(text, torch.Tensor) and text.dim() == 3 else 0
    patch, patch_t = get("patch_size", None), get("patch_size_t", None)
    if hidden.dim() == 5 and patch is not None:
        if isinstance(patch, (tuple, list)):
            pt, ph, pw = patch
        else:
            pt, ph, pw = (patch_t or 1), patch, patch
        if cls.startswith("CogVideoX"):
            frames, height, width = hidden.shape[1], hidden.shape[3], hidden.shape[4]
            position = "before"
        else:
            frames, height, width = hidden.shape[2], hidden.shape[3], hidden.shape[4]
            position = "after"
            if cls.startswith("Wan"):
                text_len, position = 0, "before"
            elif not cls.startswith("Hunyuan"):
                return None
        return TokenLayout.video(frames // pt, height // ph, width // pw, text_len, position)
    grid = [kwargs.get(n) for n in ("num_frames", "height", "width")]
    if hidden.dim() == 3 and all(isinstance(g, int) and g > 0 for g in grid):  # LTX: packed latents + grid
        pt, p = (patch_t or 1), (patch if isinstance(patch, int) else 1)
        lay = TokenLayout.video(grid[0] // pt, grid[1] // p, grid[2] // p)
        return lay if lay.seq_len == hidden.shape[1] else None
    ids = kwargs.get("img_ids")
    if hidden.dim() == 3 and isinstance(ids, torch.Tensor) and ids.shape[-1] == 3:
        ids = ids[0] if ids.dim() == 3 else ids
        height, width = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if height * width != hidden.shape[1]:
            return None
        return TokenLayout.video(1, height, width, text_len, "before")
    return None


class _SparseProcessor:
    """Runs the original processor with its SDPA calls routed (scope: this layer, the step's role)."""

    def __init__(self, original, layer, name, handle):
        self.original, self.layer, self.name, self._handle = original, layer, name, handle
        # diffusers filters keyword arguments by inspect.signature(processor.__call__)
        target = original.__call__

        def call(*args, **kwargs):
            return self(*args, **kwargs)
        try:
            call.__signature__ = inspect.signature(target)
        except (TypeError, ValueError):
            pass
        self.__call__ = call

    def __call__(self, *args, **kwargs):
        handle = self._handle
        ring = _ring_config(self.original)
        if ring is not None:  # diffusers' ring: its native op has no LSE, so the ring is ours
            return self._ring_call(ring, args, kwargs)
        scope = {"layer": self.layer, "name": self.name, "calls": 0, "role": handle._role}
        if handle._layout is not None:
            scope["layout"] = handle._layout
        route_token, scope_token = _ROUTE.set(handle._route), _SCOPE.set(scope)
        try:
            with _SDPAMode():
                return self.original(*args, **kwargs)
        finally:
            _SCOPE.reset(scope_token)
            _ROUTE.reset(route_token)

    def _ring_call(self, ring, args, kwargs):
        """The original processor on this rank's shard, its SDPA call run as sparse ring attention."""
        from ..distributed.sdpa_ring import RingSDPA
        handle, parallel = self._handle, self.original._parallel_config
        mode = RingSDPA(handle.config, ring._ring_mesh.get_group(), self.layer, handle._role, handle._layout)
        self.original._parallel_config = None  # the processor's attention call then is plain SDPA on shards
        try:
            with mode:
                return self.original(*args, **kwargs)
        finally:
            self.original._parallel_config = parallel
            handle._route.stats.update(sparse=mode.sparse, ring=mode.calls)

    def __getattr__(self, item):  # attributes of the wrapped processor (e.g. _attention_backend)
        if item == "original":
            raise AttributeError(item)
        return getattr(self.original, item)

    def __setattr__(self, item, value):
        # diffusers' enable_parallelism sets _parallel_config on each processor: it belongs to the wrapped one
        if item in ("original", "layer", "name", "_handle", "__call__"):
            object.__setattr__(self, item, value)
        else:
            setattr(self.original, item, value)


class DiffusersHandle:
    """What :func:`apply` returns: remove the patch, read the counters, start a new generation.

    Attributes:
        config: the :class:`~sparse_attn.integrations.sdpa.SparseConfig` in use.
        layers: ``{processor name: layer index}`` of the wrapped self-attention modules.
        stats: counter of ``"sparse"`` calls and ``"fallback:<reason>"`` calls.
    """

    def __init__(self, models, config, num_steps, layout, pipeline):
        self.config = config
        self.models = models
        self.layers = {}
        self._num_steps, self._layout_arg, self._pipeline = num_steps, layout, pipeline
        # a call with Lq != Lk inside a wrapped module is cross-attention after all: original SDPA
        self._route = _Route(config, scoped=True, self_attention_only=True, where="diffusers.apply")
        self._role, self._layout = None, None
        self._originals: List[tuple] = []
        self._hooks = []

    @property
    def stats(self):
        return self._route.stats

    @property
    def cache(self):
        return self.config.cache

    def new_generation(self, num_steps: Optional[int] = None):
        """Forget every cached mask now (the timestep hook also does this when the timestep goes back up)."""
        if self.cache is not None:
            self.cache.reset(num_steps)

    def _pre_hook(self, model, timestep_index):
        def hook(module, args, kwargs):
            t = kwargs.get("timestep")
            if t is None and timestep_index is not None and len(args) > timestep_index:
                t = args[timestep_index]
            num_steps = self._num_steps
            if num_steps is None and self._pipeline is not None:
                num_steps = getattr(self._pipeline, "_num_timesteps", None) or None
            self._role = None
            if self.cache is not None and t is not None:
                self._role = self.cache.observe_timestep(t, num_steps)
            elif self.cache is not None and num_steps is not None:
                self.cache.num_steps = num_steps
            if callable(self._layout_arg):
                self._layout = self._layout_arg(module, args, kwargs)
            elif self._layout_arg == "auto":
                self._layout = infer_layout(module, args, kwargs)
            else:
                self._layout = self._layout_arg
            return None
        return hook

    def remove(self):
        """Put every original processor back and remove the hooks (idempotent)."""
        for module, original in reversed(self._originals):
            if hasattr(module, "set_processor"):
                module.set_processor(original)
            else:
                module.processor = original
        self._originals.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def _models_of(target):
    if isinstance(target, torch.nn.Module):
        return [target], None
    models = [getattr(target, n, None) for n in ("transformer", "transformer_2", "unet")]
    models = [m for m in models if isinstance(m, torch.nn.Module)]
    if not models:
        raise TypeError(f"target must be a diffusers model (torch.nn.Module) or a pipeline with a transformer or "
                        f"unet, got {type(target).__name__}.")
    return models, target


def _is_self_attention(name, module) -> bool:
    """Self (or joint text+image) attention: no ``is_cross_attention``, not an ``attn2`` (diffusers' name for
    cross-attention), keys projected from the query width."""
    if hasattr(module, "is_cross_attention"):
        return not bool(module.is_cross_attention)
    if name.rsplit(".", 1)[-1] == "attn2":
        return False
    cross, query = getattr(module, "cross_attention_dim", None), getattr(module, "query_dim", None)
    return cross is None or query is None or cross == query


def apply(target, config, *, num_steps: Optional[int] = None, layout="auto",
          modules: Optional[Callable] = None) -> DiffusersHandle:
    """Route the self-attention of a diffusers transformer (or pipeline) through sparse attention.

    Args:
        target: a pipeline (its ``transformer``, ``transformer_2`` or ``unet`` is patched) or a model.
        config: a :class:`~sparse_attn.integrations.sdpa.SparseConfig` (or a pattern / mapping
            ``layer -> pattern`` / plan). Its ``cache`` decides when masks are built.
        num_steps: denoising steps per generation (for ``warmup_fraction``); a pipeline's own
            count is read at each step when not given.
        layout: ``"auto"`` (derived from the latents, see :func:`infer_layout`), a
            :class:`~sparse_attn.layout.TokenLayout`, None, or ``fn(model, args, kwargs) -> layout``.
        modules: extra predicate ``(name, attention_module) -> bool`` on the self-attention modules.

    Returns:
        :class:`DiffusersHandle`; ``handle.remove()`` (or ``with``) restores the processors.
    """
    models, pipeline = _models_of(target)
    config = as_config(config)
    if not (layout is None or layout == "auto" or isinstance(layout, TokenLayout) or callable(layout)):
        raise TypeError(f"layout must be 'auto', a TokenLayout, None or a callable, got {layout!r}.")
    if modules is not None and not callable(modules):
        raise TypeError(f"modules must be a predicate (name, module) -> bool or None, got {type(modules).__name__}.")
    handle = DiffusersHandle(models, config, num_steps, layout, pipeline)
    layer = 0
    try:
        for model in models:
            processors = getattr(model, "attn_processors", None)
            if not isinstance(processors, dict):
                raise TypeError(f"{type(model).__name__} has no attn_processors; apply() needs a diffusers model.")
            chosen = {}
            for proc_name, proc in processors.items():
                mod_name = proc_name[: -len(".processor")] if proc_name.endswith(".processor") else proc_name
                module = model.get_submodule(mod_name)
                if isinstance(proc, _SparseProcessor):
                    raise ValueError(f"{mod_name} is already patched by sparse_attn; remove the other handle first.")
                if _is_self_attention(mod_name, module) and (modules is None or modules(mod_name, module)):
                    chosen[mod_name] = (module, proc)
            _check_backends(model, {n: p for n, (_, p) in chosen.items()})
            _check_parallel({n: p for n, (_, p) in chosen.items()})
            for mod_name, (module, proc) in chosen.items():
                wrapper = _SparseProcessor(proc, layer, mod_name, handle)
                handle.layers[mod_name] = layer
                handle._originals.append((module, proc))
                if hasattr(module, "set_processor"):
                    module.set_processor(wrapper)
                else:
                    module.processor = wrapper
                layer += 1
            params = list(inspect.signature(model.forward).parameters)
            t_index = params.index("timestep") if "timestep" in params else None
            handle._hooks.append(model.register_forward_pre_hook(handle._pre_hook(model, t_index), with_kwargs=True))
    except Exception:
        handle.remove()
        raise
    if not handle.layers:
        raise ValueError("apply() found no self-attention module to patch.")
    if config.cache is not None and config.cache.num_layers is None:
        config.cache.num_layers = layer
    return handle


__all__ = ["apply", "infer_layout", "DiffusersHandle"]
