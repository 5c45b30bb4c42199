"""The ``sparse-attn`` command (also ``python -m sparse_attn``).

Subcommands:
    bench     kernel sweeps: ours vs dense SDPA vs compiled FlexAttention (and flash-attn when installed)
    patterns  mask-building cost and quality of each pattern on synthetic inputs (needs the pattern layer)
    inspect   draw a pattern's block map to a PNG and print an ASCII summary
    quality   perplexity of a causal LM (transformers) patched with each configuration, against dense

Example:
    sparse-attn bench --quick
    sparse-attn bench --seq-lens 2048,4096 --densities 0.1,0.3 --out bench_out
    sparse-attn inspect random-blocks --seq-len 2048 --density 0.2 --out mask.png
    sparse-attn quality --model DIR --text book.txt --tokens 4096 --configs moba,streamingllm:window=512
"""

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .bench.sweeps import CPU_BAR, SWEEPS, Case, get_sweep

BUILTIN_MASKS = ("random-blocks", "full")
_LIST_AXES = {  # option -> (Case field, parser)
    "seq_lens": ("seq_len", int), "densities": ("density", float), "head_dims": ("head_dim", int),
    "dtypes": ("dtype", str), "modes": ("mode", str), "kinds": ("kind", str),
}
_SCALAR_AXES = {"heads": "heads", "kv_heads": "kv_heads", "batch": "batch", "block": "block",
                "verticals": "verticals", "slashes": "slashes"}


def _csv_list(kind):
    def parse(text):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from err
    return parse


class UsageError(Exception):
    """Bad command-line input: :func:`main` prints ``sparse-attn <command>: <message>`` and exits with 2."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sparse-attn: --device cuda was asked for, but torch sees no CUDA device.")
    return dev


# ---- bench ------------------------------------------------------------------------------------
def _select_cases(args, device: torch.device) -> Tuple[List[Case], str]:
    """The cases to run and the sweep name: the named sweep with the axis options applied."""
    if args.quick and args.sweep:
        raise SystemExit("sparse-attn bench: use either --quick or --sweep, not both.")
    if args.sweep:
        name = args.sweep
    elif args.quick:
        name = "quick-gpu" if device.type == "cuda" else "quick-cpu"
    else:
        name = "gpu-check" if device.type == "cuda" else "cpu"
    try:
        cases = get_sweep(name)
    except ValueError as err:
        raise SystemExit(f"sparse-attn bench: {err}") from None
    for opt, (field, _) in _LIST_AXES.items():
        values = getattr(args, opt)
        if values:
            cases = [replace(c, **{field: v}) for c in cases for v in values]
    for opt, field in _SCALAR_AXES.items():
        if getattr(args, opt) is not None:
            cases = [replace(c, **{field: getattr(args, opt)}) for c in cases]
    if args.causal:
        cases = [replace(c, causal=True) for c in cases]
    try:
        for case in cases:
            case.check()
    except ValueError as err:
        raise SystemExit(f"sparse-attn bench: {err}") from None
    return list(dict.fromkeys(cases)), name  # drop duplicates, keep order


def _bar_summary(rows) -> Optional[str]:
    """The CPU speed target line (ours >= 4x faster than dense SDPA on CPU at 10% density) if that row was run."""
    pick = [r for r in rows if r["device"] == "cpu" and r["seq_len"] == CPU_BAR.seq_len and r["heads"] == 8
            and r["head_dim"] == 64 and r["block"] == 64 and r["density"] == CPU_BAR.density
            and not r["causal"] and r["mode"] == "fwd" and r["kind"] == "block"]
    ours = next((r for r in pick if r["impl"] == "ours"), None)
    if not ours or not ours.get("speedup_vs_dense"):
        return None
    s = ours["speedup_vs_dense"]
    if ours["check"] != "ok":
        verdict = f"NOT MET (check: {ours['check']})"
    else:
        verdict = "met" if s >= 4 else f"MISSED (needs {4 / s:.1f}x more speed)"
    return (f"CPU speed target, block-sparse forward at L=8192, H=8, D=64, 64x64 blocks, 10% density: dense SDPA "
            f"time / ours = {s:.2f}x (target: >= 4x) -> {verdict}")


def cmd_bench(args) -> int:
    from .bench import report
    from .bench.machine import load_average, machine_header
    from .bench.runner import run_sweep

    if args.list_sweeps:
        for name, cases in SWEEPS.items():
            print(f"{name:18s} {len(cases):4d} cases  e.g. {cases[0].label()}")
        return 0
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impls:
        from .bench.runner import check_impls

        try:
            check_impls(args.impls)
        except ValueError as err:
            raise SystemExit(f"sparse-attn bench: --impls: {err}") from None
    cases, name = _select_cases(args, device)
    header = machine_header(device)
    header["sweep"] = name
    print(f"sparse-attn bench: sweep {name!r}, {len(cases)} cases on {device} "
          f"({header['gpu'] if device.type == 'cuda' else header['cpu']}, {header['cpu_threads']} threads)",
          flush=True)
    if device.type == "cpu":
        print("  (FlexAttention is compiled on first use of each shape: the first rows take longer to run)",
              flush=True)
    impls = args.impls or None
    rows = run_sweep(cases, device, impls=impls, check_rows=args.check_rows, min_run_time=args.min_run_time,
                     progress=not args.no_progress, rounds=args.rounds)
    for r in rows:
        r["device"] = device.type
    header["loadavg_1m_at_end"] = load_average()
    print()
    print(report.format_table(rows))
    print()
    print(report.legend())
    for line in report.header_lines(header):
        print("  " + line)
    bar = _bar_summary(rows)
    if bar:
        print(bar)
    busy = header["loadavg_1m_at_start"]
    if device.type == "cpu" and busy > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: the machine was busy before this run (1-minute load {busy} on {os.cpu_count()} cores): "
              "CPU timings are disturbed by other work; rerun on a quiet machine before quoting them.")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report.write_csv(out / "results.csv", rows, header)
        report.write_json(out / "results.json", rows, header, {"cases": [c.as_dict() for c in cases]})
        (out / "results.md").write_text(report.format_markdown(rows) + "\n", encoding="utf-8")
        written = [out / "results.csv", out / "results.json", out / "results.md"]
        if not args.no_plots:
            try:
                written += report.plot(rows, out, title=f"{header['gpu'] if device.type == 'cuda' else header['cpu']}"
                                       f" | torch {header['torch']} | {header['date_utc']}")
            except ImportError as err:
                print(f"no plots: {err}", file=sys.stderr)
        print("wrote " + ", ".join(str(p) for p in written))
    bad = [r for r in rows if r["impl"].startswith("ours") and r.get("check") in ("WRONG", "error")]
    if bad:
        print(f"sparse-attn bench: {len(bad)} row(s) of our kernels failed the check: "
              + "; ".join(f"{r['impl']} L={r['seq_len']} dens={r['density']}: {r['check']} {r['check_detail']}"
                          for r in bad[:5]), file=sys.stderr)
        return 1
    return 0


# ---- patterns -----------------------------------------------------------------------------------
def _print_dicts(rows: List[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)
    widths = {k: max(len(k), *(len(cell(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(cell(r.get(k, "")).ljust(widths[k]) for k in keys))


def cmd_patterns(args) -> int:
    try:
        from .patterns.synthetic import pattern_table
    except ImportError as err:
        print("sparse-attn patterns: the pattern layer (sparse_attn.patterns) is not part of this "
              f"installation yet ({err}); there is nothing to measure.", file=sys.stderr)
        return 2
    from .bench import report
    from .bench.machine import machine_header

    names = args.names or None
    if names is not None:
        _check_table_names(names, args.seq_len)
    print(f"sparse-attn patterns: seq_len={args.seq_len}, patterns={names or 'all'}", flush=True)
    if args.no_progress:
        rows = pattern_table(seq_len=args.seq_len, names=names)
    else:  # one call per pattern name, so that a bar can show progress
        from .bench.report import progress_bar

        try:
            from .patterns.synthetic import table_configs

            order = list(dict.fromkeys(p.name for p, _, _ in table_configs(args.seq_len)))
        except ImportError:
            order = list(_registry()[1])
        order = [n for n in order if names is None or n in names]
        rows = []
        bar = progress_bar(total=len(order), desc="patterns", unit="pattern")
        for name in order:
            rows += pattern_table(seq_len=args.seq_len, names=[name])
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    if not rows:
        raise UsageError(f"the quality table has no row for {names or 'any pattern'} at seq_len={args.seq_len}.")
    _print_dicts(rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        header = machine_header(_device("auto"))
        report.write_json(out / "patterns.json", rows, header)
        with open(out / "patterns.csv", "w", encoding="utf-8") as fh:
            for k, v in header.items():
                fh.write(f"# {k}: {v}\n")
            import csv

            writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {out / 'patterns.csv'}, {out / 'patterns.json'}")
    return 0


def _check_table_names(names, seq_len) -> None:
    """Every name is a registered pattern that the quality table covers; else a UsageError saying which is not."""
    from .patterns import list_patterns
    from .patterns.synthetic import table_configs

    known = list_patterns()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown pattern name(s) {unknown}; registered patterns: {known}.")
    tabulated = sorted({p.name for p, _, _ in table_configs(seq_len)})
    missing = [n for n in names if n not in tabulated]
    if missing:
        raise UsageError(f"{missing} are registered but have no row in the quality table "
                         f"(sparse_attn.patterns.synthetic.table_configs covers {tabulated}).")


# ---- inspect ------------------------------------------------------------------------------------
def _param(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _registry():
    try:
        from .patterns import get_pattern, list_patterns
    except ImportError:
        return None, []
    return get_pattern, list(list_patterns())


def build_inspect_mask(args, device):
    """The mask ``inspect`` draws: a registered pattern, or a built-in bench mask (random-blocks, full)."""
    get_pattern, names = _registry()
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    shape_q = (args.batch, args.heads, args.seq_len, args.head_dim)
    shape_k = (args.batch, args.kv_heads or args.heads, args.seq_len, args.head_dim)
    q, k = (torch.randn(s, generator=gen).to(device) for s in (shape_q, shape_k))
    if args.name in names:
        layout = None
        if args.layout:
            try:
                layout = json.loads(args.layout)
            except json.JSONDecodeError as err:
                raise UsageError(f"--layout must be a TokenLayout as JSON, got {args.layout!r} ({err}).") from None
            try:
                from .layout import TokenLayout

                layout = TokenLayout.from_dict(layout)
            except ImportError:
                pass
            except (TypeError, ValueError) as err:
                raise UsageError(f"--layout: {err}") from None
        params = dict(args.param or [])
        try:
            pattern = get_pattern(args.name, **params)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--param for {args.name}: {err}") from None
        try:
            return pattern.build(q, k, causal=args.causal, layout=layout)
        except (TypeError, ValueError) as err:
            raise UsageError(f"{args.name} with {params or 'default parameters'} does not build for "
                             f"seq_len={args.seq_len}: {err}") from None
    if args.name == "random-blocks":
        from .bench.problems import random_block_mask

        case = Case(seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, density=args.density,
                    block=args.block, causal=args.causal)
        return random_block_mask(case, device, args.seed)
    if args.name == "full":
        from .mask import BlockSparseMask

        return BlockSparseMask.full(args.seq_len, args.seq_len, args.block, device=device)
    known = names + list(BUILTIN_MASKS)
    extra = "" if get_pattern else " (the pattern layer, sparse_attn.patterns, is not installed)"
    raise UsageError(f"pattern must be one of {known}{extra}, got {args.name!r}.")


def block_map(mask, causal: bool) -> torch.Tensor:
    """float ``[Bm, Hm, NQB, NKB]`` share of each tile's pairs that the mask keeps (1 = whole tile)."""
    if hasattr(mask, "to_block_dense") and type(mask).__name__ == "BlockSparseMask" and not causal:
        return mask.to_block_dense().float()
    bm, bn = getattr(mask, "block_size", (64, 64))
    q_len, kv_len = mask.seq_lens
    if q_len * kv_len > 2 ** 26:
        if hasattr(mask, "covering_block_mask"):  # stripe mask: the tiles holding any kept pair
            return mask.covering_block_mask().to_block_dense().float()
        if hasattr(mask, "to_block_dense"):
            return mask.to_block_dense().float()
        raise SystemExit(f"sparse-attn inspect: a {type(mask).__name__} of {q_len}x{kv_len} tokens is too large "
                         "to draw at token level; use a shorter --seq-len.")
    tok = mask.to_dense(causal=causal).float()  # [Bm, Hm, Lq, Lk]
    pad = (0, -kv_len % bn, 0, -q_len % bm)
    tok = torch.nn.functional.pad(tok, pad)
    b, h, lq, lk = tok.shape
    return tok.reshape(b, h, lq // bm, bm, lk // bn, bn).mean((3, 5))


DENSITY_LABEL = "density (kept pairs / visible pairs)"
_COUNT_LIMIT = 2 ** 26  # token pairs per head up to which inspect counts the kept pairs exactly


def visible_pairs(q_len: int, kv_len: int, causal: bool) -> int:
    """Pairs a query may see: ``Lq * Lk``, or with ``causal`` those with ``j <= i + (Lk - Lq)`` (bottom-right)."""
    if not causal:
        return q_len * kv_len
    i = torch.arange(q_len)
    return int(torch.clamp(i + (kv_len - q_len) + 1, 0, kv_len).sum())


def head_densities(mask, causal: bool) -> Optional[List[float]]:
    """Per head of batch 0: kept (query, key) pairs / visible pairs, counted on the token map (with ``causal``
    the kept pairs are those the causal predicate leaves, the visible ones the causal ones). None when the map
    has more than ``2**26`` pairs per head."""
    q_len, kv_len = mask.seq_lens
    if q_len * kv_len > _COUNT_LIMIT:
        return None
    visible = visible_pairs(q_len, kv_len, causal)
    if visible == 0:
        return None
    tok = mask.to_dense(causal=causal)[0]  # [Hm, Lq, Lk] bool
    return [int(t.sum()) / visible for t in tok]


def _describe(mask) -> str:
    """Kind, shapes and block size of a mask (no density: inspect prints one, labelled, per head)."""
    parts = [f"seq_lens={tuple(mask.seq_lens)}"]
    for attr in ("batch_heads", "block_size"):
        if hasattr(mask, attr):
            parts.append(f"{attr}={tuple(getattr(mask, attr))}")
    return f"{type(mask).__name__}(" + ", ".join(parts) + ")"


def ascii_map(tiles: torch.Tensor, width: int = 64) -> str:
    """ASCII picture of a ``[NQB, NKB]`` map of kept shares, pooled to at most ``width`` columns."""
    ramp = ":-=+*#%"  # partly kept tiles, by the share of their pairs kept
    n_q, n_k = tiles.shape
    step = max(1, math.ceil(max(n_q, n_k) / width))
    pooled = torch.nn.functional.avg_pool2d(tiles[None, None].float(), step, ceil_mode=True)[0, 0]

    def char(x):
        return "." if x <= 0 else "@" if x >= 0.999 else ramp[min(len(ramp) - 1, int(x * len(ramp)))]
    lines = ["".join(char(x) for x in row) for row in pooled.tolist()]
    return f"({n_q}x{n_k} tiles, {step}x{step} tiles per character; '.' nothing kept, '@' all kept, ':-=+*#%' partly)\n" + \
        "\n".join("  " + line for line in lines)


def cmd_inspect(args) -> int:
    device = _device(args.device)
    mask = build_inspect_mask(args, device)
    tiles = block_map(mask, args.causal).cpu()  # [Bm, Hm, NQB, NKB]
    densities = head_densities(mask, args.causal)
    print(_describe(mask))
    visible = "the causally visible pairs, j <= i + Lk - Lq" if args.causal else "all Lq x Lk pairs"
    print(f"{DENSITY_LABEL}, visible = {visible}; counted per head on the token map" if densities is not None else
          f"{DENSITY_LABEL}: not counted (more than {_COUNT_LIMIT} pairs per head; use a shorter --seq-len)")
    heads = list(range(min(tiles.shape[1], args.draw_heads)))

    def dens(h):
        return "" if densities is None else f"{densities[h]:.1%}"
    for h in heads:
        print(f"[batch 0, head {h}] {DENSITY_LABEL}: {dens(h) or 'not counted'}")
        print(ascii_map(tiles[0, h]))
    out = Path(args.out or f"{args.name}_L{args.seq_len}.png")
    from .bench.report import matplotlib_pyplot

    try:
        plt = matplotlib_pyplot()
    except ImportError as err:
        print(f"sparse-attn inspect: no PNG written: {err}", file=sys.stderr)
        return 2
    import matplotlib

    fig, axes = plt.subplots(1, len(heads), figsize=(3.6 * len(heads) + 1.2, 3.6), squeeze=False,
                             layout="constrained")
    bm, bn = getattr(mask, "block_size", (args.block, args.block))
    for ax, h in zip(axes[0], heads):
        img = ax.imshow(tiles[0, h].numpy(), cmap="Blues", interpolation="nearest",
                        norm=matplotlib.colors.PowerNorm(0.4, vmin=0, vmax=1))  # faint tiles stay visible
        ax.set(title=f"head {h}" + (f": density {dens(h)}" if dens(h) else ""), xlabel=f"key block ({bn} tokens)",
               ylabel=f"query block ({bm} tokens)")
    fig.colorbar(img, ax=axes[0].tolist(), shrink=0.8, label="share of the tile's pairs kept")
    fig.suptitle(f"{args.name}  L={args.seq_len}{'  causal' if args.causal else ''}", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


# ---- entry point --------------------------------------------------------------------------------
# ---- quality ----------------------------------------------------------------------------------
def _split_configs(text: str) -> List[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def cmd_quality(args) -> int:
    from .bench import lm_quality as lq
    from .bench.machine import machine_header
    from .bench.report import write_csv, write_json

    try:
        configs = [lq.parse_config(c, min_seq_len=args.min_seq_len) for c in _split_configs(args.configs)]
    except (ValueError, TypeError) as err:
        raise UsageError(f"--configs: {err}") from None
    if not configs:
        raise UsageError("--configs: give at least one configuration")
    text_path = Path(args.text)
    if not text_path.is_file():
        raise UsageError(f"--text: {args.text!r} is not a file")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok = lq.load_causal_lm(args.model, args.gguf, args.dtype)
        ids = tok(text_path.read_text(encoding="utf-8", errors="replace"), return_tensors="pt").input_ids
        windows = lq.token_windows(ids, args.tokens, args.windows)
    except ValueError as err:
        raise UsageError(str(err)) from None
    header = machine_header(torch.device("cpu"))
    header.update(model=args.model, gguf=args.gguf or "", text=str(text_path), tokens=args.tokens,
                  windows=args.windows, dtype=args.dtype)
    rows = lq.evaluate(model, windows, configs, progress=None if args.quiet else print)
    summary = [r for r in rows if r["window"] == "all"]
    print(lq.format_rows(summary))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "quality.csv", rows, header, lq.COLUMNS)
        write_json(out / "quality.json", rows, header)
        if not args.no_plots:
            try:
                lq.plot_pareto(rows, out / "pareto.png", title=f"{Path(args.model).name}, {text_path.name}, "
                                                               f"{args.tokens} tokens")
            except ImportError as err:
                print(f"sparse-attn quality: no plot ({err})", file=sys.stderr)
        print(f"wrote {out / 'quality.csv'} and {out / 'quality.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-attn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time our kernels against dense SDPA, FlexAttention and flash-attn",
                       description="Time our kernels against dense SDPA and torch.compile(flex_attention) on the "
                                   "identical mask; every row is checked against float64 math first.")
    b.add_argument("--quick", action="store_true", help="the short sweep for this device (under 2 min on a CPU)")
    b.add_argument("--sweep", help=f"named sweep: {', '.join(SWEEPS)}")
    b.add_argument("--list-sweeps", action="store_true", help="list the named sweeps and exit")
    for opt, (field, kind) in _LIST_AXES.items():
        b.add_argument("--" + opt.replace("_", "-"), type=_csv_list(kind), help=f"comma-separated {field} values "
                       "(replaces that axis of the sweep)")
    for opt in _SCALAR_AXES:
        b.add_argument("--" + opt.replace("_", "-"), type=int)
    b.add_argument("--causal", action="store_true", help="bottom-right causal masking on top of the mask")
    b.add_argument("--impls", type=_csv_list(str),
                   help="implementations: ours, sdpa (CPU), sdpa-flash/-cudnn/-efficient/-math (GPU), flex, "
                        "flash-attn (default: ours, dense SDPA, flex, flash-attn when installed)")
    b.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    b.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    b.add_argument("--check-rows", type=int, default=128, help="query rows checked against float64 math per case")
    b.add_argument("--min-run-time", type=float, default=1.0,
                   help="CPU: seconds of timing per implementation and case, split over the rounds")
    b.add_argument("--rounds", type=int, help="CPU: timing rounds that interleave the implementations; each row "
                   "reports the median of its rounds (default 3 on CPU, 1 on GPU)")
    b.add_argument("--out", help="directory for results.csv, results.json and the PNG plots")
    b.add_argument("--no-plots", action="store_true", help="with --out: skip the PNG plots")
    b.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser("patterns", help="mask-building cost and quality of each pattern on synthetic inputs")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--names", type=_csv_list(str), help="comma-separated pattern names (default: all)")
    p.add_argument("--out", help="directory for patterns.csv and patterns.json")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.set_defaults(func=cmd_patterns)

    i = sub.add_parser("inspect", help="draw a pattern's block map to a PNG and print an ASCII summary")
    i.add_argument("name", help="a registered pattern name, or a built-in mask: " + ", ".join(BUILTIN_MASKS))
    i.add_argument("--seq-len", type=int, default=1024)
    i.add_argument("--heads", type=int, default=2)
    i.add_argument("--kv-heads", type=int)
    i.add_argument("--head-dim", type=int, default=64)
    i.add_argument("--batch", type=int, default=1)
    i.add_argument("--causal", action="store_true")
    i.add_argument("--layout", help="token layout as JSON, passed to pattern.build(layout=...)")
    i.add_argument("--param", type=_param, action="append", help="pattern option key=value (JSON value), repeatable")
    i.add_argument("--density", type=float, default=0.2, help="random-blocks: share of key blocks per query block")
    i.add_argument("--block", type=int, default=64, help="random-blocks/full: block size")
    i.add_argument("--draw-heads", type=int, default=4, help="heads to draw")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--device", default="cpu")
    i.add_argument("--out", help="PNG path (default <name>_L<seq_len>.png)")
    i.set_defaults(func=cmd_inspect)

    qp = sub.add_parser("quality", help="perplexity of a causal LM patched with each configuration, vs dense",
                        description="Run a transformers causal LM over windows of a text, dense and with each "
                                    "configuration; print perplexity, change vs dense, density, mask-build and "
                                    "total time.")
    qp.add_argument("--model", required=True, help="local model folder (transformers format, or holding --gguf)")
    qp.add_argument("--gguf", help="GGUF file name inside --model")
    qp.add_argument("--text", required=True, help="UTF-8 text file to score")
    qp.add_argument("--tokens", type=int, default=4096, help="tokens per window")
    qp.add_argument("--windows", type=int, default=1, help="consecutive windows of --tokens tokens")
    qp.add_argument("--configs", required=True,
                    help="comma-separated: presets or patterns with options, e.g. moba:k=6,"
                         "exact_importance:select=0.2,block_topp:p=0.9+sink_local:sink=64:window=64")
    qp.add_argument("--min-seq-len", type=int, default=1024, help="shorter prompts run dense")
    qp.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    qp.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    qp.add_argument("--out", help="directory for quality.csv, quality.json and pareto.png")
    qp.add_argument("--no-plots", action="store_true")
    qp.add_argument("--quiet", action="store_true", help="print only the summary table")
    qp.set_defaults(func=cmd_quality)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"sparse-attn {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
