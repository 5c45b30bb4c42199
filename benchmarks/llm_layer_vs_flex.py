"""One SmolLM2-shaped attention layer on CPU: dense SDPA, this package's CPU path and compiled FlexAttention on
the same ``moba`` mask (per GQA group and per query head), in one process.

Shape: 9 query / 3 kv heads, D 64, causal, random q/k/v (the mask is built from them, so its density is the
preset's fixed budget). FlexAttention gets the identical mask (``sparse_attn.flex.to_flex_block_mask``) and is
compiled once per mask before timing; outputs are checked against each other. Time only on an idle machine.

Usage:
    python benchmarks/llm_layer_vs_flex.py --tokens 4096,8192 --out bench_out/llm_layer_vs_flex.json
"""

import argparse
import sys

import torch
import torch.nn.functional as F

from sparse_attn import sparse_attention
from sparse_attn.bench.machine import load_average, machine_header
from sparse_attn.bench.report import write_json
from sparse_attn.bench.timing import time_cpu
from sparse_attn.flex import to_flex_block_mask
from sparse_attn.integrations.presets import moba

GROUPS = {"per group": "softmax", "per head": None}


def layer_rows(n_tokens, flex):
    """Rows ``{tokens, selection, density, dense_ms, ours_ms, flex_ms}`` for one length."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, n_tokens, 64, generator=gen)
    k, v = (torch.randn(1, 3, n_tokens, 64, generator=gen) for _ in range(2))
    dense_ms = time_cpu(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    rows = []
    for label, group in GROUPS.items():
        mask = moba(group=group).pattern.build(q, k, causal=True)
        block_mask = to_flex_block_mask(mask, causal=True, num_heads=q.shape[1])
        ours = sparse_attention(q, k, v, mask, causal=True)
        theirs = flex(q, k, v, block_mask=block_mask, enable_gqa=True)  # compiles
        diff = float((ours - theirs).abs().max())
        if not diff < 1e-4:
            raise RuntimeError(f"{label}: outputs differ by {diff} (ours vs FlexAttention)")
        rows.append(dict(tokens=n_tokens, selection=label, density=float(mask.density(causal=True)),
                         dense_ms=dense_ms,
                         ours_ms=time_cpu(lambda: sparse_attention(q, k, v, mask, causal=True)),
                         flex_ms=time_cpu(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--out", help="JSON file for the rows and the machine header")
    args = ap.parse_args(argv)
    from torch.nn.attention.flex_attention import flex_attention

    header = machine_header(torch.device("cpu"))
    flex = torch.compile(flex_attention, dynamic=False)
    rows = [r for n in (int(x) for x in args.tokens.split(",")) for r in layer_rows(n, flex)]
    header["loadavg_1m_at_end"] = load_average()
    print("| tokens | selection | density | dense SDPA ms | ours ms (vs dense) | compiled Flex ms (vs dense) | ours / Flex |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['selection']} | {r['density']:.3f} | {r['dense_ms']:.1f} | {r['ours_ms']:.1f} "
              f"(×{r['ours_ms'] / r['dense_ms']:.2f}) | {r['flex_ms']:.1f} (×{r['flex_ms'] / r['dense_ms']:.2f}) | "
              f"{r['ours_ms'] / r['flex_ms']:.2f} |")
    if args.out:
        write_json(args.out, rows, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
