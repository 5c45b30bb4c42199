"""End-to-end prefill of SmolLM2-135M on CPU: dense vs each LLM preset, time and perplexity, in one run.

Per length, the rounds interleave dense and every configuration (``model(ids)``, no cache, no labels), and each
row reports the median; then one pass with labels gives the perplexity change and the density (the
``sparse-attn quality`` harness). Timed prefill computes the last position's logits only, as ``generate()``
does (``--logits all``: every position's, as a scoring pass). Time only on an idle machine: the header records
the load average.

Usage:
    python benchmarks/llm_end_to_end.py                       # moba, streamingllm, minference at 4k and 8k
    python benchmarks/llm_end_to_end.py --tokens 4096 --configs moba --rounds 5 --out bench_out/e2e.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_quality import smollm2  # noqa: E402
from lm_texts import text_file  # noqa: E402

from sparse_attn.bench.machine import load_average, machine_header  # noqa: E402
from sparse_attn.bench import lm_quality as lq  # noqa: E402
from sparse_attn.integrations import transformers as hf  # noqa: E402

NAME = "sparse_attn_e2e"


def _prefill_s(model, ids, logits="last"):
    """Seconds of one forward over ``ids``; ``logits="last"`` computes the last position's logits only (what
    ``generate()`` runs at prefill: ``logits_to_keep=1``), ``"all"`` every position's (a scoring pass)."""
    keep = {"last": 1, "all": 0}[logits]
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=keep)
    return time.perf_counter() - t0


def time_configs(model, ids, configs, rounds, logits="last"):
    """``{label: [seconds per round]}`` with ``"dense"`` first; rounds interleave the configurations."""
    times = {"dense": []}
    times.update({c.label: [] for c in configs})
    for _ in range(rounds):
        model.set_attn_implementation("sdpa")
        times["dense"].append(_prefill_s(model, ids, logits))
        for c in configs:
            hf.register(c.make(), name=NAME)
            model.set_attn_implementation(NAME)
            times[c.label].append(_prefill_s(model, ids, logits))
            model.set_attn_implementation("sdpa")
    hf.unregister(NAME)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--configs", default="moba,streamingllm,minference")
    ap.add_argument("--text", default="shakespeare", help="a text of benchmarks/lm_texts.py (the essays hold only 4.7k tokens)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--logits", choices=("last", "all"), default="last",
                    help="last: the last position's logits only, as generate() prefills (default); all: every position")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="JSON file for the rows and the machine header")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = machine_header(torch.device("cpu"))
    configs = [lq.parse_config(c) for c in args.configs.split(",") if c]
    model, tok = smollm2()
    ids_all = tok(text_file(args.text).read_text(encoding="utf-8"), return_tensors="pt").input_ids
    rows = []
    for n in (int(x) for x in args.tokens.split(",")):
        ids = lq.token_windows(ids_all, n)[0]
        _prefill_s(model, ids[:, :1024])  # warm-up
        times = time_configs(model, ids, configs, args.rounds, args.logits)
        quality = {r["config"]: r for r in lq.evaluate(model, [ids], configs) if r["window"] == "all"}
        dense = statistics.median(times["dense"])
        for label, ts in times.items():
            q = quality[label]
            rows.append(dict(config=label, tokens=n, logits=args.logits, seconds=statistics.median(ts), rounds=ts,
                             vs_dense=statistics.median(ts) / dense, ppl=q["ppl"], change_pct=q["change_pct"],
                             density=q["density"], build_s=q["build_s"]))
            print(f"{n:6d}  {label:28s} {rows[-1]['seconds']:7.2f} s  x{rows[-1]['vs_dense']:.2f} of dense  "
                  f"ppl {q['ppl']:.3f} ({q['change_pct']:+.2f}%)  density {q['density']:.3f}", flush=True)
    header["loadavg_1m_at_end"] = load_average()
    print("| tokens | configuration | prefill s | vs dense | perplexity | vs dense ppl | density |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | `{r['config']}` | {r['seconds']:.2f} | ×{r['vs_dense']:.2f} | {r['ppl']:.3f} | "
              f"{r['change_pct']:+.2f}% | {r['density']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": header, "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
