"""Perplexity of a patched causal LM against its dense self: the harness behind ``sparse-attn quality``.

A configuration is named by a string (see :func:`parse_config`): a preset (``moba``,
``streamingllm:window=512``), a registered pattern with options (``exact_importance:select=0.2``),
or a union of patterns joined by ``+`` (``block_topp:p=0.9+sink_local:sink=64:window=64``).

For each window of ``tokens`` tokens of the text, the model runs once dense (SDPA) and once per
configuration through :mod:`sparse_attn.integrations.transformers`; each row reports the
perplexity, its change against dense on the same tokens, the density (the share of the causally
visible pairs that attention computes, averaged over the attention calls; calls that ran dense
count 1), the time spent building masks and the total time of the forward pass.

Example:
    >>> parse_config("streamingllm:window=512").family   # doctest: +SKIP
    'streamingllm'
"""

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch


@dataclass(frozen=True)
class NamedConfig:
    """A configuration string and the maker of its :class:`~sparse_attn.integrations.sdpa.SparseConfig`."""

    label: str
    family: str
    make: Callable


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(parts, label):
    """``["k=8", "group=softmax"]`` -> ``{"k": 8, "group": "softmax"}`` (values read as JSON, else kept as text);
    ``label`` names the configuration in errors."""
    kw = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"configuration {label!r}: option {part!r} must be key=value.")
        key, val = part.split("=", 1)
        kw[key.strip()] = _value(val.strip())
    return kw


def parse_config(label: str, min_seq_len: int = 1024) -> NamedConfig:
    """``NAME[:key=value...]`` (a preset or a registered pattern), or patterns joined by ``+`` (their union)."""
    from ..patterns import Union, get_pattern, list_patterns
    from ..integrations.presets import PRESETS, get_preset
    from ..integrations.sdpa import SparseConfig

    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"a configuration must be a non-empty string, got {label!r}.")
    members = [m.strip() for m in label.split("+")]
    specs = []
    for m in members:
        name, *parts = [p.strip() for p in m.split(":")]
        specs.append((name, parse_options(parts, label)))
    if len(specs) == 1 and specs[0][0] in PRESETS:
        name, kw = specs[0]
        kw.setdefault("min_seq_len", min_seq_len)
        get_preset(name, **kw)  # bad options fail here, before any model runs
        return NamedConfig(label, name, lambda: get_preset(name, **kw))
    for name, _ in specs:
        if name not in list_patterns():
            raise ValueError(f"configuration {label!r}: {name!r} is neither a preset ({sorted(PRESETS)}) nor a "
                             f"registered pattern ({list_patterns()}).")

    def make():
        pats = [get_pattern(name, **kw) for name, kw in specs]
        return SparseConfig(pats[0] if len(pats) == 1 else Union(patterns=tuple(pats)), min_seq_len=min_seq_len)

    make()  # bad options fail here
    return NamedConfig(label, "+".join(name for name, _ in specs), make)


class MaskMeter:
    """Wraps a pattern: records each mask's density (share of the visible pairs) and its build time.

    ``runs_dense(mask, causal)``: masks the integration will not run sparse (over the config's ``max_density``):
    their density is not recorded, as the call is counted dense."""

    def __init__(self, pattern, runs_dense=None):
        self.pattern, self.densities, self.build_s = pattern, [], 0.0
        self.runs_dense = runs_dense
        if hasattr(pattern, "build_stateful"):
            self.build_stateful = self._build_stateful

    def _record(self, mask, causal, t0):
        self.build_s += time.perf_counter() - t0
        if self.runs_dense is None or not self.runs_dense(mask, causal):
            self.densities.append(float(mask.density(causal=causal)))

    def build(self, q, k, *, causal=False, layout=None):
        t0 = time.perf_counter()
        mask = self.pattern.build(q, k, causal=causal, layout=layout)
        self._record(mask, causal, t0)
        return mask

    def _build_stateful(self, q, k, *, causal=False, layout=None, state=None):
        t0 = time.perf_counter()
        mask, state = self.pattern.build_stateful(q, k, causal=causal, layout=layout, state=state)
        self._record(mask, causal, t0)
        return mask, state


class LayerMeters:
    """Per-layer :class:`MaskMeter` s for a configuration whose pattern depends on the layer (a mapping
    ``layer -> pattern``, a plan, a callable): ``pattern_for(layer)`` gives the metered pattern (None: dense)."""

    def __init__(self, config, runs_dense=None):
        self._config, self.meters, self.runs_dense = config, {}, runs_dense

    def pattern_for(self, layer):
        if layer not in self.meters:
            pattern = self._config.pattern_for(layer)
            self.meters[layer] = None if pattern is None else MaskMeter(pattern, self.runs_dense)
        return self.meters[layer]

    @property
    def densities(self):
        return [d for m in self.meters.values() if m is not None for d in m.densities]

    @property
    def build_s(self):
        return sum(m.build_s for m in self.meters.values() if m is not None)


def metered(config):
    """Wrap ``config.pattern`` in place with a :class:`MaskMeter` (one pattern) or :class:`LayerMeters` (a
    per-layer pattern); returns the meter."""
    from ..integrations.sdpa import too_dense
    from ..integrations.warm_start import is_pattern

    def runs_dense(mask, causal):
        return too_dense(config, mask, causal)
    if is_pattern(config.pattern):
        meter = MaskMeter(config.pattern, runs_dense)
    else:
        meter = LayerMeters(copy.copy(config), runs_dense)
    config.pattern = meter
    return meter


def load_causal_lm(path: str, gguf: Optional[str] = None, dtype: str = "float32"):
    """``(model, tokenizer)``: a transformers causal LM from a local folder (or a GGUF file in it), eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(path, str) or not Path(path).exists():
        raise ValueError(f"model must be a local model folder, got {path!r} (it does not exist).")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}.")
    kw = {} if gguf is None else {"gguf_file": gguf}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kw).eval()
    return model, tok


def token_windows(ids: torch.Tensor, tokens: int, windows: int = 1) -> List[torch.Tensor]:
    """``windows`` consecutive, non-overlapping ``[1, tokens]`` slices of ``ids [1, N]``."""
    for name, v in (("tokens", tokens), ("windows", windows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if ids.shape[-1] < tokens * windows:
        raise ValueError(f"the text has {ids.shape[-1]} tokens; {windows} window(s) of {tokens} need "
                         f"{tokens * windows}.")
    return [ids[..., i * tokens:(i + 1) * tokens] for i in range(windows)]


def _loss(model, ids):
    t0 = time.perf_counter()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    return loss, time.perf_counter() - t0


def evaluate(model, windows: Sequence[torch.Tensor], configs: Sequence[NamedConfig],
             name: str = "sparse_attn_quality", progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """One row per (configuration, window) plus a ``window="all"`` row per configuration (perplexity of the
    mean loss over the windows). The dense rows come first, with ``config="dense"``."""
    from ..integrations import transformers as hf

    previous = model.config._attn_implementation
    rows, dense = [], []
    try:
        model.set_attn_implementation("sdpa")
        for w, ids in enumerate(windows):
            loss, secs = _loss(model, ids)
            dense.append(loss)
            rows.append(dict(config="dense", family="dense", window=w, tokens=ids.shape[-1], ppl=math.exp(loss),
                             change_pct=0.0, density=1.0, build_s=0.0, total_s=secs, sparse_calls=0,
                             dense_calls=None))
            if progress:
                progress(f"dense window {w}: ppl {math.exp(loss):.3f} ({secs:.1f} s)")
        rows.append(_overall("dense", "dense", rows[-len(windows):], dense, dense))
        for cfg in configs:
            losses, mine = [], []
            for w, ids in enumerate(windows):
                sc = cfg.make()
                meter = metered(sc)
                hf.register(sc, name=name)
                model.set_attn_implementation(name)
                loss, secs = _loss(model, ids)
                model.set_attn_implementation("sdpa")
                counts = hf.stats[name]
                n_sparse = counts.get("sparse", 0)
                n_dense = sum(v for k, v in counts.items() if k.startswith("dense:"))
                calls = n_sparse + n_dense
                density = (sum(meter.densities) + n_dense) / calls if calls else float("nan")
                losses.append(loss)
                mine.append(dict(config=cfg.label, family=cfg.family, window=w, tokens=ids.shape[-1],
                                 ppl=math.exp(loss), change_pct=(math.exp(loss - dense[w]) - 1) * 100,
                                 density=density, build_s=meter.build_s, total_s=secs, sparse_calls=n_sparse,
                                 dense_calls=n_dense))
                if progress:
                    r = mine[-1]
                    progress(f"{cfg.label} window {w}: ppl {r['ppl']:.3f} ({r['change_pct']:+.2f}%) density "
                             f"{density:.3f} build {meter.build_s:.2f} s total {secs:.1f} s")
            rows += mine
            rows.append(_overall(cfg.label, cfg.family, mine, losses, dense))
    finally:
        model.set_attn_implementation(previous)
        if name in hf.stats:
            hf.unregister(name)
    return rows


def _overall(label, family, rows, losses, dense):
    mean, base = sum(losses) / len(losses), sum(dense) / len(dense)
    avg = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return dict(config=label, family=family, window="all", tokens=rows[0]["tokens"], ppl=math.exp(mean),
                change_pct=(math.exp(mean - base) - 1) * 100, density=avg("density"), build_s=avg("build_s"),
                total_s=avg("total_s"), sparse_calls=rows[0]["sparse_calls"], dense_calls=rows[0]["dense_calls"])


COLUMNS = ("config", "family", "window", "tokens", "ppl", "change_pct", "density", "build_s", "total_s",
           "sparse_calls", "dense_calls")


def format_rows(rows: Sequence[dict]) -> str:
    """A fixed-width table of ``rows``."""
    def cell(key, v):
        if isinstance(v, float):
            return f"{v:+.2f}%" if key == "change_pct" else (f"{v:.3f}" if key in ("ppl", "density") else f"{v:.2f}")
        return str(v)
    table = [COLUMNS] + [tuple(cell(k, r.get(k)) for k in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table)


def pareto(rows: Sequence[dict]) -> List[dict]:
    """The ``window="all"`` rows no other row beats on both density and perplexity change (lower is better)."""
    pts = [r for r in rows if r["window"] == "all" and r["config"] != "dense"]
    return sorted((r for r in pts if not any(o is not r and o["density"] <= r["density"] and
                                             o["change_pct"] <= r["change_pct"] and
                                             (o["density"], o["change_pct"]) != (r["density"], r["change_pct"])
                                             for o in pts)), key=lambda r: r["density"])


def plot_pareto(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Perplexity change against density, one curve per pattern family, the Pareto front dashed."""
    from .report import matplotlib_pyplot

    plt = matplotlib_pyplot()
    pts = [r for r in rows if r["window"] == "all" and r["config"] != "dense"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for fam in dict.fromkeys(r["family"] for r in pts):
        rs = sorted((r for r in pts if r["family"] == fam), key=lambda r: r["density"])
        ax.plot([r["density"] for r in rs], [r["change_pct"] for r in rs], marker="o", label=fam)
    front = pareto(rows)
    if len(front) > 1:
        ax.plot([r["density"] for r in front], [r["change_pct"] for r in front], "k--", lw=0.8, label="Pareto front")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set(xlabel="density (share of the causally visible pairs)", ylabel="perplexity vs dense (%)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["NamedConfig", "parse_config", "parse_options", "MaskMeter", "LayerMeters", "metered", "load_causal_lm", "token_windows",
           "evaluate", "format_rows", "pareto", "plot_pareto", "COLUMNS"]
