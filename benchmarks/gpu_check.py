"""Device check (issue 2 item 8): the GPU tests and a short benchmark, in under 6 minutes.

    python benchmarks/gpu_check.py [--out bench_out/gpu_check] [--budget-s 330] [--skip-tests]

1. ``pytest -m gpu`` on ``tests/``;
2. our kernel vs dense SDPA (flash backend) vs ``torch.compile(flex_attention)`` on the same
   BlockMask: bf16, D = 64 and 128, L in {4k, 16k, 64k}, density in {10%, 30%, 100%}
   (sweep ``gpu-check``), each row checked against float64 math on sampled rows first;
3. forward+backward rows (sweep ``gpu-check-bwd``) when the backward pass exists;
4. stripe rows (sweep ``gpu-check-stripe``) when ``StripeSparseMask`` exists;
4b. token-exact rows (sweep ``gpu-check-token-exact``): packed documents and a sliding window, partial
   tiles with in-kernel predicates, vs Flex on the same ``mask_mod``;
5. the issue-6 routing bar: k-means routing mask build (10 / 2 warm iterations) vs dense SDPA, bf16, 32k;
6. decode over a KV cache (``benchmarks/decode.py``): one Llama-3-8B layer's decode step, bf16, at 8k/32k/128k
   cached keys, dense (SDPA, our kernel) vs kinetics/quest page selection at 1/8 and 1/16 of the pages, and the
   fp32 exactness bars (every page = dense, paged = contiguous, bit for bit).

Prints one compact table (one line per case) and the bars of issues 2/3/4; writes CSV/JSON.
Exits 2 on a machine without CUDA, 1 if a test or a check of our kernels failed.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_tests(timeout_s: float) -> str:
    """Run ``pytest -m gpu`` and return its summary line."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"TIMEOUT after {timeout_s:.0f} s"
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        print("\n".join(lines[-30:]))
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    return ("PASS " if proc.returncode in (0, 5) else "FAIL ") + summary


def compact(rows) -> str:
    """One line per case: ours / SDPA-flash / flex ms and the two ratios."""
    from sparse_attn.bench.report import _length

    cases = {}
    for r in rows:
        key = (r["kind"], r["mode"], r["head_dim"], r["seq_len"], r["density"], r["causal"])
        cases.setdefault(key, {})[r["impl"]] = r
    head = (f"{'kind':6} {'mode':6} {'D':>4} {'L':>5} {'dens':>6} {'ours ms':>9} {'sdpa ms':>9} {'flex ms':>9} "
            f"{'ours/sdpa':>9} {'ours/flex':>9}  check")
    out = [head, "-" * len(head)]
    for (kind, mode, d, n, dens, causal), by in cases.items():
        dense_name = next((r.get("dense_impl") for r in by.values() if r.get("dense_impl")), "sdpa-flash")
        ours, sdpa, flex = by.get("ours", {}), by.get(dense_name, {}), by.get("flex", {})
        ms = lambda r: f"{r['ms']:9.3f}" if r.get("ms") else f"{'-':>9}"  # noqa: E731
        ratio = lambda a, b: f"{a['ms'] / b['ms']:9.3f}" if a.get("ms") and b.get("ms") else f"{'-':>9}"  # noqa: E731
        checks = [f"{name}:{r['check']}" for name, r in by.items() if r.get("check") != "ok"] or ["ok"]
        if kind == "stripe":  # issue 4: our block kernel on the covering tiles, and the lowering cost
            blocks = by.get("ours-blocks", {})
            checks.append(f"[ours-blocks {blocks['ms']:.3f} ms]" if blocks.get("ms") else "[ours-blocks -]")
            checks += [n for n in (ours.get("notes") or "").split("; ") if n.startswith("stripe lowering")]
        dens_txt = f"{r_density(ours, dens):6.1%}"
        out.append(f"{kind:6} {mode:6} {d:>4} {_length(n):>5} {dens_txt} {ms(ours)} {ms(sdpa)} {ms(flex)} "
                   f"{ratio(ours, sdpa)} {ratio(ours, flex)}  {' '.join(checks)}")
    return "\n".join(out)


def r_density(row, fallback):
    return row.get("density_actual") if row.get("density_actual") is not None else fallback


def bars(rows) -> list:
    """The GPU bars of issue 2 (D=128, L=64k, non-causal) as lines."""
    def ms(impl, dens):
        for r in rows:
            if (r["impl"], r["head_dim"], r["seq_len"], r["density"], r["mode"], r["kind"]) == \
                    (impl, 128, 65536, dens, "fwd", "block") and r.get("ms") and r.get("check") == "ok":
                return r["ms"]
        return None
    lines = []
    for dens, limit, what in ((1.0, 1.1, "SDPA-flash"), (0.1, 0.15, "SDPA-flash")):
        a, b = ms("ours", dens), ms("sdpa-flash", dens)
        if a and b:
            lines.append(f"bar: D=128 L=64k density {dens:.0%}: ours/{what} = {a / b:.3f} (<= {limit}) -> "
                         f"{'met' if a / b <= limit else 'MISSED'}")
    for dens in (0.1, 0.3, 1.0):
        a, b = ms("ours", dens), ms("flex", dens)
        if a and b:
            lines.append(f"bar: D=128 L=64k density {dens:.0%}: ours/flex = {a / b:.3f} (<= 1.0) -> "
                         f"{'met' if a / b <= 1.0 else 'MISSED'}")
    return lines or ["bars: the D=128, L=64k rows did not produce checked timings"]


def _decode_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sparse_attn_decode_bench", ROOT / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_decode(device, contexts):
    """Decode rows and bar lines (section 6); an error becomes a line, not a failed check."""
    bench = _decode_module()
    try:
        lengths = [int(c) for c in contexts.split(",")]
        rows = bench.decode_rows(device, lengths, [0.125, 0.0625],
                                 patterns=("kinetics", "quest", "loki", "loki:granularity=page", "kinetics:rerank=2"),
                                 min_run_time=0.05 if device.type == "cpu" else 1.0, progress=False)
        return rows, bench.bars(rows, context=32768 if 32768 in lengths else lengths[-1]) + \
            bench.exactness_lines(device)
    except Exception as err:  # noqa: BLE001 -- report and go on with the rest of the check
        return [], [f"decode rows: error {type(err).__name__}: {str(err)[:300]}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "gpu_check"))
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop starting new cases after this")
    parser.add_argument("--tests-timeout-s", type=float, default=120.0)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--sweeps", help="comma-separated sweeps instead of gpu-check[,-bwd,-stripe] (testing)")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to test this script")
    parser.add_argument("--routing-length", type=int, default=32768, help="L of the routing bar (0: skip it)")
    parser.add_argument("--decode-contexts", default="8192,32768,131072",
                        help="cached keys of the decode rows (empty: skip them)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is visible to torch {torch.__version__} (CUDA build: "
              f"{torch.version.cuda or 'none'}); this check needs an NVIDIA GPU. "
              "On a CPU-only machine run `sparse-attn bench --quick` instead.", file=sys.stderr)
        return 2

    from sparse_attn.bench import report
    from sparse_attn.bench.machine import machine_header
    from sparse_attn.bench.runner import backward_status, run_case, stripe_mask_class
    from sparse_attn.bench.sweeps import get_sweep

    start = time.perf_counter()
    device = torch.device(args.device)
    header = machine_header(device)
    print(f"gpu_check on {header['gpu'] if device.type == 'cuda' else header['cpu']} | torch {header['torch']} | triton {header['triton']} | "
          f"commit {header['git_commit']} | {header['date_utc']}", flush=True)
    test_line = "skipped (--skip-tests)" if args.skip_tests else run_tests(args.tests_timeout_s)
    print(f"GPU tests (pytest -m gpu): {test_line}  [{time.perf_counter() - start:.0f} s]", flush=True)

    reason = backward_status(device)
    if args.sweeps:
        sections = [(name, None) for name in args.sweeps.split(",")]
    else:
        sections = [("gpu-check", None), ("gpu-check-bwd", reason),
                    ("gpu-check-stripe", None if stripe_mask_class() else
                     "stripe kernel not installed (no sparse_attn.stripe_mask module)"),
                    ("gpu-check-token-exact", None)]
    rows, skipped = [], []
    for name, why_not in sections:
        if why_not:
            print(f"{name}: skipped: {why_not}", flush=True)
            continue
        for case in get_sweep(name):
            if time.perf_counter() - start > args.budget_s:
                skipped.append(case.label())
                continue
            t0 = time.perf_counter()
            rows += run_case(case, device, check_rows=128, backward=reason,
                             min_run_time=0.05 if device.type == "cpu" else 1.0)
            if not args.no_progress:
                print(f"  {case.label()}  [{time.perf_counter() - t0:.1f} s]", flush=True)
    for r in rows:
        r["device"] = device.type
    routing = []
    if args.routing_length and time.perf_counter() - start <= args.budget_s:
        from sparse_attn.bench.routing_bar import format_rows, routing_bar_rows
        routing = routing_bar_rows(device, length=args.routing_length,
                                   min_run_time=0.05 if device.type == "cpu" else 1.0)
    elif args.routing_length:
        skipped.append("routing bar")
    decode_rows, decode_lines = [], []
    if args.decode_contexts and time.perf_counter() - start <= args.budget_s:
        decode_rows, decode_lines = run_decode(device, args.decode_contexts)
    elif args.decode_contexts:
        skipped.append("decode rows")
    print()
    print(compact(rows))
    if routing:
        print(format_rows(routing))
    if decode_rows or decode_lines:
        print(_decode_module().format_rows(decode_rows) if decode_rows else "")
        for line in decode_lines:
            print(line)
    print("ratios: time of ours / time of the baseline (lower is better); check: float64 math on sampled rows")
    for line in bars(rows):
        print(line)
    if skipped:
        print(f"not run (time budget {args.budget_s:.0f} s): {len(skipped)} cases, e.g. {skipped[0]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header["tests"] = test_line
    report.write_csv(out / "results.csv", rows, header)
    report.write_json(out / "results.json", rows, header, {"skipped": skipped, "routing_bar": routing,
                                                           "decode": decode_rows, "decode_bars": decode_lines})
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}  [total {time.perf_counter() - start:.0f} s]")
    bad = [r for r in rows if r["impl"].startswith("ours") and r.get("check") in ("WRONG", "error")]
    bad += [r for r in decode_rows if r["check"] != "ok"] + [ln for ln in decode_lines if "MISSED" in ln
                                                               and "bit for bit" in ln]
    return 1 if bad or test_line.startswith(("FAIL", "TIMEOUT")) else 0


if __name__ == "__main__":
    sys.exit(main())
