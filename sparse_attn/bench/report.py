"""Printing and saving benchmark rows: a text table, CSV/JSON with the machine header, PNG plots."""

import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

COLUMNS = ["seq_len", "heads", "head_dim", "dtype", "causal", "mode", "kind", "density", "verticals", "slashes",
           "block", "impl", "density_actual", "ms", "tflops", "speedup_vs_dense", "ratio_vs_flex", "dense_impl",
           "first_call_s", "ms_rounds", "check", "check_detail", "notes"]
_CASE_KEYS = ("kind", "seq_len", "heads", "kv_heads", "batch", "head_dim", "dtype", "density", "verticals",
              "slashes", "block", "causal", "mode")


BENCH_EXTRA = "pip install 'sparse-attn[bench]'  (matplotlib, tqdm)"


def progress_bar(**kw):
    """A tqdm bar, or None (with a note on stderr) when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(f"(no progress bar: tqdm is not installed; {BENCH_EXTRA})", file=sys.stderr)
        return None
    return tqdm(dynamic_ncols=True, **kw)


def matplotlib_pyplot():
    """``matplotlib.pyplot`` on the Agg backend; ``ImportError`` naming the extra to install."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"plots need matplotlib: {BENCH_EXTRA}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 100 else f"{x:.3g}"


def _length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def format_table(rows: Sequence[dict]) -> str:
    """One line per (case, implementation); cases separated by a blank line."""
    head = ["L", "H", "D", "dtype", "mode", "density", "impl", "ms", "TFLOP/s", "vs dense", "vs flex", "check"]
    lines, last = [], None
    for r in rows:
        key = tuple(r.get(k) for k in _CASE_KEYS)
        if last is not None and key != last:
            lines.append(None)
        last = key
        dens = r.get("density_actual")
        dens_txt = f"{dens:.1%}" if dens is not None else f"~{r['density']:.0%}"
        mode = r["mode"] + (" causal" if r.get("causal") else "")
        if r.get("kind") == "stripe":
            mode += f" stripe v{r['verticals']}/s{r['slashes']}" if r["verticals"] or r["slashes"] else " stripe"
        check = r.get("check", "-")
        if check not in ("ok",):
            check += f" ({r.get('check_detail', '')})"[:90]
        lines.append([_length(r["seq_len"]), str(r["heads"]), str(r["head_dim"]),
                      r["dtype"].replace("float", "fp").replace("bfp16", "bf16"), mode, dens_txt, r["impl"],
                      _ms(r.get("ms")), _num(r.get("tflops"), ".3g"),
                      _num(r.get("speedup_vs_dense"), ".2f") + ("x" if r.get("speedup_vs_dense") else ""),
                      _num(r.get("ratio_vs_flex"), ".2f") + ("x" if r.get("ratio_vs_flex") else ""), check])
    widths = [max(len(head[i]), *(len(x[i]) for x in lines if x)) for i in range(len(head) - 1)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i in (0, 1, 2, 5, 7, 8, 9, 10) else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))) + "  " + cells[-1]
    out = [fmt(head), fmt(["-" * w for w in widths] + ["-----"])]
    out += ["" if x is None else fmt(x) for x in lines]
    return "\n".join(out)


def format_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table, one line per (case, implementation), for docs/benchmarks.md."""
    head = "| L | H | D | dtype | mode | density | impl | ms | TFLOP/s | vs dense | vs flex | check |"
    out = [head, "|" + "---|" * 12]
    for r in rows:
        dens = r.get("density_actual")
        mode = r["mode"] + (" causal" if r.get("causal") else "") + (" stripe" if r.get("kind") == "stripe" else "")
        check = r.get("check", "-")
        if check != "ok":
            check += f" ({r.get('check_detail', '')})"[:80].replace("|", "/")
        out.append("| " + " | ".join([
            _length(r["seq_len"]), str(r["heads"]), str(r["head_dim"]), r["dtype"], mode,
            f"{dens:.1%}" if dens is not None else "-", r["impl"], _ms(r.get("ms")), _num(r.get("tflops"), ".3g"),
            _num(r.get("speedup_vs_dense"), ".2f"), _num(r.get("ratio_vs_flex"), ".2f"), check]) + " |")
    return "\n".join(out)


def legend() -> str:
    return ("ms: median time. TFLOP/s: dense FLOPs x density / time (same work for every row of a case). "
            "vs dense: dense time / this time (higher is better). vs flex: this time / compiled FlexAttention "
            "time on the identical mask (lower is better). check: output (and gradients for fwdbwd) vs float64 "
            "math attention on sampled query rows, tolerance rule of the tests; WRONG rows must not be trusted.")


def header_lines(header: Dict[str, object]) -> List[str]:
    keys = ("date_utc", "device", "gpu", "cpu", "cpu_threads", "torch", "triton", "flash_attn", "sparse_attn",
            "git_commit", "loadavg_1m_at_start", "loadavg_1m_at_end", "command")
    return [f"{k}: {header[k]}" for k in keys if k in header]


def write_csv(path: Path, rows: Sequence[dict], header: dict, columns: Sequence[str] = COLUMNS) -> None:
    """CSV of ``columns`` with ``# key: value`` machine lines first (``pandas.read_csv(path, comment='#')``)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        for k, v in header.items():
            fh.write(f"# {k}: {v}\n")
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def write_json(path: Path, rows: Sequence[dict], header: dict, extra: Optional[dict] = None) -> None:
    payload = {"machine": header, "rows": list(rows)}
    if extra:
        payload.update(extra)
    Path(path).write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


def _series(rows, x_key, group_keys, impl):
    groups = {}
    for r in rows:
        if r["impl"] != impl or r.get("ms") is None or r.get("check") != "ok":
            continue
        groups.setdefault(tuple(r[k] for k in group_keys), []).append(r)
    return {g: sorted(rs, key=lambda r: r[x_key]) for g, rs in groups.items()}


def plot(rows: Sequence[dict], out_dir: Path, title: str = "") -> List[Path]:
    """``speed_vs_length.png`` and ``speedup_vs_density.png`` (only plots with at least two points)."""
    plt = matplotlib_pyplot()
    block = [r for r in rows if r.get("kind", "block") == "block"]
    impls = list(dict.fromkeys(r["impl"] for r in block))
    written = []
    # ms vs sequence length, one panel per density
    densities = sorted({r["density"] for r in block})
    lengths = {r["seq_len"] for r in block}
    if len(lengths) > 1:
        fig, axes = plt.subplots(1, len(densities), figsize=(4.2 * len(densities), 3.6), squeeze=False)
        for ax, dens in zip(axes[0], densities):
            for impl in impls:
                for g, rs in _series([r for r in block if r["density"] == dens], "seq_len",
                                     ("head_dim", "dtype", "mode"), impl).items():
                    if len(rs) > 1:
                        ax.plot([r["seq_len"] for r in rs], [r["ms"] for r in rs], marker="o",
                                label=f"{impl} D={g[0]} {g[1]} {g[2]}")
            ax.set(yscale="log", xlabel="sequence length", ylabel="ms (median)", title=f"block density {dens:.0%}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(lengths), [_length(n) for n in sorted(lengths)])
            ax.minorticks_off()
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "speed_vs_length.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    # speedup vs density, one line per (impl, length)
    if len(densities) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in impls:
            if impl.startswith("sdpa"):
                continue
            for g, rs in _series(block, "density", ("seq_len", "head_dim", "dtype", "mode"), impl).items():
                rs = [r for r in rs if r.get("speedup_vs_dense")]
                if len(rs) > 1:
                    ax.plot([r["density_actual"] for r in rs], [r["speedup_vs_dense"] for r in rs], marker="o",
                            linestyle="-" if impl == "ours" else "--",
                            label=f"{impl} L={_length(g[0])} D={g[1]} {g[2]} {g[3]}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(xlabel="density (share of query-key pairs)", ylabel="speedup vs dense SDPA", yscale="log",
               title="speedup vs density")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "speedup_vs_density.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
