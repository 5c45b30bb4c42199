"""Run benchmark cases: build inputs and masks, check every implementation, then time it.

One row per (case, implementation). Implementations:

- ``ours``: :func:`sparse_attn.sparse_attention` on the case's mask (block or stripe);
- ``ours-blocks`` (stripe cases): our block kernel on the blocks that cover the stripe pattern;
- ``sdpa`` (CPU) / ``sdpa-<backend>`` (GPU): dense ``scaled_dot_product_attention``;
- ``flex``: ``torch.compile(flex_attention)`` on the identical mask (``to_flex_block_mask``, or
  a token-exact ``mask_mod`` for stripe cases);
- ``flash-attn``: dense ``flash_attn_func`` when the package is importable (GPU, fp16/bf16).
"""

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..flex import to_flex_block_mask
from ..ops import sparse_attention
from . import problems as P
from .sweeps import Case
from .timing import time_fn

GPU_SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
_COMPILED = {}


def stripe_mask_class():
    """``StripeSparseMask`` if the stripe kernel is installed, else None."""
    try:
        from ..stripe_mask import StripeSparseMask
    except ImportError:
        return None
    return StripeSparseMask


def flash_attn_func():
    try:
        from flash_attn import flash_attn_func as fn
    except Exception:  # noqa: BLE001 - a broken CUDA build counts as "not installed"
        return None
    return fn


def backward_status(device: torch.device) -> Optional[str]:
    """None if ``sparse_attention`` has a backward on ``device``, else the reason it has not."""
    q = torch.randn(1, 1, 32, 16, device=device, requires_grad=True)
    try:
        sparse_attention(q, q, q).sum().backward()
    except NotImplementedError as err:
        return f"backward not implemented on {device.type}: {str(err).splitlines()[0]}"
    except Exception as err:  # noqa: BLE001 - reported per row, never hidden
        return f"backward failed on {device.type}: {type(err).__name__}: {err}"
    return None


def compiled_flex():
    if "flex" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


IMPLS = ("ours", "ours-blocks", "sdpa", "flex", "flash-attn") + tuple(f"sdpa-{b}" for b in GPU_SDPA_BACKENDS)


def check_impls(names: Sequence[str]) -> None:
    """``ValueError`` naming the unknown implementation names, if any."""
    unknown = [n for n in names if n not in IMPLS]
    if unknown:
        raise ValueError(f"implementations must be among {list(IMPLS)}, got unknown {unknown}.")


def _sdpa(backend: Optional[str], causal: bool, gqa: bool) -> Callable:
    def run(q, k, v):
        kw = {"is_causal": causal, "enable_gqa": True} if gqa else {"is_causal": causal}
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, **kw)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                                               "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[backend])]):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return run


def _flex(block_mask, gqa: bool, kernel_options=None) -> Callable:
    flex = compiled_flex()

    def run(q, k, v):
        return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa, kernel_options=kernel_options)
    return run


def _flash(causal: bool) -> Callable:
    fn = flash_attn_func()

    def run(q, k, v):  # flash-attn takes [B, L, H, D]
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    return run


class Problem:
    """Inputs, masks and references of one case on one device."""

    def __init__(self, case: Case, device: torch.device, check_rows: int, seed: int = 0):
        self.case, self.device = case, device
        self.q, self.k, self.v = P.make_qkv(case, device, seed)
        self.rows = P.sample_rows(case, device, check_rows, seed)
        self.notes: List[str] = []
        self.cover = None
        if case.kind == "block":
            self.mask = P.random_block_mask(case, device, seed)
            self.keep = P.block_keep_rows(self.mask, self.rows)
            self.density = self.mask.density(causal=case.causal)  # computed / visible pairs
            self.flex_mask = to_flex_block_mask(self.mask, case.causal, num_heads=case.heads)
        elif case.kind == "stripe":
            cls = stripe_mask_class()
            if cls is None:
                raise RuntimeError("stripe kernel not installed (no sparse_attn.stripe_mask module)")
            vertical, slash = P.stripe_indices(case, device, seed)
            is_vert, is_slash = P.stripe_tables(vertical, slash, case.seq_len)
            build = lambda: cls.from_vertical_slash(vertical, slash, seq_lens=(case.seq_len, case.seq_len),  # noqa: E731
                                                    block_size=case.block)
            self.mask = build()
            self.notes.append(f"stripe lowering {time_fn(build, device, min_run_time=0.2):.2f} ms")
            self.keep = P.stripe_keep_rows(is_vert, is_slash, self.rows, case.seq_len)
            self.density = self._stripe_density()
            if hasattr(self.mask, "covering_block_mask"):
                self.cover = self.mask.covering_block_mask()
            else:
                self.cover = P.stripe_cover_mask(is_vert, is_slash, case)
            self.cover_keep = P.block_keep_rows(self.cover, self.rows)
            self.flex_mask = self._stripe_flex_mask(is_vert, is_slash)
        elif case.kind in ("document", "window"):
            self.mask, mask_mod = P.token_exact_mask(case, device, seed)
            self.keep = P.token_keep_rows(self.mask, self.rows)
            self.density = self.mask.density(causal=case.causal)
            self.notes.append(f"{self.mask.density(causal=False):.3f} of all pairs; partial tiles: "
                              f"{P.partial_tile_share(self.mask, case.causal):.1%}")
            from torch.nn.attention.flex_attention import create_block_mask

            # FlexAttention on the same mask_mod, with its own 128-token blocks
            self.flex_mask = create_block_mask(mask_mod, 1, 1, case.seq_len, case.seq_len, device=device,
                                               BLOCK_SIZE=128, _compile=device.type == "cuda")
        else:
            raise ValueError(f"case.kind must be 'block', 'stripe', 'document' or 'window', got {case.kind!r}.")
        self._refs: Dict[str, tuple] = {}

    def _stripe_density(self) -> float:
        try:
            return float(self.mask.density(causal=self.case.causal))
        except TypeError:
            if not self.case.causal:
                return float(self.mask.density())
        j = torch.arange(self.case.seq_len, device=self.device)
        vis = self.keep & (j[None, :] <= self.rows[:, None])
        self.notes.append("density estimated on the sampled rows")
        return vis.float().mean().item()

    def _stripe_flex_mask(self, is_vert, is_slash):
        from torch.nn.attention.flex_attention import create_block_mask

        n, causal = self.case.seq_len, self.case.causal
        if hasattr(self.mask, "flex_mask_mod"):  # the mask's own token-exact predicate
            mask_mod = self.mask.flex_mask_mod(causal=causal, num_heads=self.case.heads)
        else:
            per_head = is_vert.shape[0] > 1

            def mask_mod(b, h, q_idx, kv_idx):
                hh = h if per_head else 0
                keep = is_vert[hh, kv_idx] | is_slash[hh, q_idx - kv_idx + n - 1]
                return keep & (kv_idx <= q_idx) if causal else keep

        # compiled mask building on GPU: the eager path materializes [H, L, L] (275 GB at 128k)
        return create_block_mask(mask_mod, 1, self.case.heads, n, n, device=self.device,
                                 BLOCK_SIZE=max(self.case.block, 128), _compile=self.device.type == "cuda")

    def impls(self, names: Sequence[str]) -> Dict[str, tuple]:
        """name -> (function of (q, k, v), what it computes: 'mask' | 'dense' | 'cover')."""
        case, gqa = self.case, self.case.heads != self.case.n_kv_heads
        out = {}
        for name in names:
            if name == "ours":
                out[name] = (lambda q, k, v: sparse_attention(q, k, v, self.mask, causal=case.causal), "mask")
            elif name == "ours-blocks":
                if self.cover is not None:
                    out[name] = (lambda q, k, v: sparse_attention(q, k, v, self.cover, causal=case.causal), "cover")
            elif name == "sdpa":
                out[name] = (_sdpa(None, case.causal, gqa), "dense")
            elif name.startswith("sdpa-") and name[5:] in GPU_SDPA_BACKENDS:
                out[name] = (_sdpa(name[5:], case.causal, gqa), "dense")
            elif name == "flex":
                out[name] = (self.flex_candidates(gqa), "mask")
            elif name == "flash-attn":
                out[name] = (_flash(case.causal), "dense")
            else:
                raise ValueError(f"unknown implementation {name!r}.")
        return out

    def flex_candidates(self, gqa: bool) -> List[tuple]:
        """FlexAttention on the identical mask, in the order tried: ``[(fn, note)]``.

        Inductor's default tiles (e.g. 128 x 64 on Hopper) must divide the BlockMask's block
        size; for a 64 x 64 mask the second candidate pins the kernel tile to the mask block,
        and the last one states the same mask on 128-token blocks through a ``mask_mod``
        lookup of the block map (token-exact, partial blocks masked in the tile).
        """
        cands = [(_flex(self.flex_mask, gqa), "")]
        bm, bn = self.case.block, self.case.block
        if self.case.kind == "block":
            cands.append((_flex(self.flex_mask, gqa, {"BLOCK_M": bm, "BLOCK_N": bn}),
                          f"flex kernel_options BLOCK_M=BLOCK_N={bm}"))
            if bm < 128 and 128 % bm == 0:
                cands.append((lambda q, k, v: _flex(self._flex_lookup_mask(), gqa)(q, k, v),
                              f"flex on 128-token blocks with a mask_mod lookup of the {bm}x{bn} map"))
        return cands

    def _flex_lookup_mask(self):
        if getattr(self, "_lookup", None) is None:
            from torch.nn.attention.flex_attention import create_block_mask

            keep = self.mask.to_block_dense()  # [Bm, Hm, NQB, NKB]
            hm, bm, bn = keep.shape[1], self.mask.block_size[0], self.mask.block_size[1]
            shift, causal = self.mask.kv_len - self.mask.q_len, self.case.causal

            def mask_mod(b, h, q_idx, kv_idx):
                ok = keep[0, h % hm if hm > 1 else 0, q_idx // bm, kv_idx // bn]
                return ok & (kv_idx <= q_idx + shift) if causal else ok

            self._lookup = create_block_mask(mask_mod, 1, self.case.heads, self.mask.q_len, self.mask.kv_len,
                                             device=self.device, BLOCK_SIZE=128,
                                             _compile=self.device.type == "cuda")
        return self._lookup

    def reference(self, target: str, grad_out=None):
        """(ref fp64, lowp in the input dtype) outputs of the sampled rows, plus gradients when asked."""
        key = (target, grad_out is not None)
        if key not in self._refs:
            keep = {"mask": self.keep, "dense": None, "cover": getattr(self, "cover_keep", None)}[target]
            res = []
            for dtype in (torch.float64, self.q.dtype):
                if grad_out is None:
                    res.append((P.math_rows(self.q, self.k, self.v, self.rows, keep, self.case.causal, dtype),))
                    continue
                leaves = [x.detach().clone().requires_grad_() for x in (self.q, self.k, self.v)]
                o = P.math_rows(*leaves, self.rows, keep, self.case.causal, dtype)
                grads = torch.autograd.grad(o, leaves, grad_out[:, :, self.rows].to(o.dtype))
                res.append((o.detach(), *grads))
            self._refs[key] = tuple(res)
        return self._refs[key]


def _check(problem: Problem, fn: Callable, target: str) -> dict:
    """Run ``fn`` once and compare it with the sampled-row references; returns check fields."""
    case, q = problem.case, problem.q
    factor = P.FWD_FACTOR.get(q.dtype, 2.0)
    if case.mode == "fwd":
        start = time.perf_counter()
        out = fn(problem.q, problem.k, problem.v)
        if problem.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        (ref,), (low,) = problem.reference(target)
        got = [("o", out[:, :, problem.rows], ref, low, factor)]
    else:
        grad_out = torch.zeros_like(q)
        grad_out[:, :, problem.rows] = torch.randn_like(q[:, :, problem.rows])
        leaves = [x.detach().clone().requires_grad_() for x in (problem.q, problem.k, problem.v)]
        start = time.perf_counter()
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_out)
        if problem.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        ref, low = problem.reference(target, grad_out)
        got = [("o", out[:, :, problem.rows], ref[0], low[0], factor)]
        got += [(n, g, r, lw, P.GRAD_FACTOR) for n, g, r, lw in zip(("dq", "dk", "dv"), grads, ref[1:], low[1:])]
    full = [("o", out)] + (list(zip(("dq", "dk", "dv"), grads)) if case.mode == "fwdbwd" else [])
    for name, value in full:  # every row, not only the sampled ones: NaN/inf anywhere is wrong
        if not bool(torch.isfinite(value).all()):
            return {"check": "WRONG", "check_detail": f"{name}: non-finite values", "first_call_s": seconds}
    worst = None
    for name, value, r, lw, fac in got:
        err, base = P.max_err(value, r), P.max_err(lw, r)
        ok = P.within_rule(err, base, q.dtype, fac)
        if worst is None or not ok:
            worst = {"check": "ok" if ok else "WRONG", "check_detail":
                     f"{name}: max err {err:.2e} vs bound {fac:g} x {base:.2e} + {P.FLOOR[q.dtype]:.0e}"}
            if not ok:
                break
    worst["first_call_s"] = seconds
    return worst


def _timed(problem: Problem, fn: Callable, min_run_time: float, warm_seconds: float) -> float:
    """Median ms of ``fn``; the check's call (``warm_seconds``) was its warm-up."""
    if problem.case.mode == "fwd":
        q, k, v = problem.q, problem.k, problem.v
        return time_fn(lambda: fn(q, k, v), problem.device, min_run_time=min_run_time, warm_seconds=warm_seconds)
    leaves = [x.detach().clone().requires_grad_() for x in (problem.q, problem.k, problem.v)]
    grad_out = torch.randn_like(problem.q)

    def step():
        torch.autograd.grad(fn(*leaves), leaves, grad_out)
    return time_fn(step, problem.device, grad_to_none=leaves, min_run_time=min_run_time, warm_seconds=warm_seconds)


def default_impls(device: torch.device, kind: str = "block") -> List[str]:
    """Implementations measured by default on ``device``."""
    dense = ["sdpa-flash"] if device.type == "cuda" else ["sdpa"]
    names = ["ours"] + (["ours-blocks"] if kind == "stripe" else []) + dense + ["flex"]
    if device.type == "cuda" and flash_attn_func() is not None:
        names.append("flash-attn")
    return names


def run_case(case: Case, device: torch.device, impls: Optional[Sequence[str]] = None, check_rows: int = 128,
             min_run_time: float = 1.0, backward: Optional[str] = None, progress=None,
             rounds: Optional[int] = None) -> List[dict]:
    """Rows (dicts) for one case: check then time each implementation.

    ``min_run_time``: seconds of timing per implementation (CPU), split over ``rounds`` rounds that
    interleave the implementations (default 3 on CPU, 1 on GPU where do_bench is used).
    ``backward``: the reason ours has no backward (from :func:`backward_status`), or None.
    Failures never stop the sweep: the row carries ``check`` = ``error``/``n/a`` and the reason.
    """
    base = case.as_dict()
    rounds = max(1, rounds if rounds is not None else (3 if device.type == "cpu" else 1))
    working: Dict[str, Callable] = {}
    names = list(impls) if impls else default_impls(device, case.kind)
    if case.kind == "stripe" and "ours-blocks" not in names and "ours" in names:
        names.insert(names.index("ours") + 1, "ours-blocks")
    try:
        problem = Problem(case, device, check_rows)
    except (RuntimeError, ImportError) as err:
        return [dict(base, impl=n, density_actual=None, ms=None, check="n/a", check_detail=str(err)) for n in names]
    rows = []
    for name, (fn, target) in problem.impls(names).items():
        if progress is not None:
            progress.set_postfix_str(f"{name}")
        row = dict(base, impl=name, density_actual=problem.density, ms=None, notes="; ".join(problem.notes))
        if case.mode == "fwdbwd" and name.startswith("ours") and backward:
            rows.append(dict(row, check="n/a", check_detail=backward))
            continue
        if name == "flash-attn" and (device.type != "cuda" or problem.q.dtype == torch.float32):
            rows.append(dict(row, check="n/a", check_detail="flash-attn needs CUDA and fp16/bf16"))
            continue
        candidates = fn if isinstance(fn, list) else [(fn, "")]
        for i, (cand, note) in enumerate(candidates):
            try:
                row.update(_check(problem, cand, target))
                row["ms"] = _timed(problem, cand, min_run_time / rounds, row["first_call_s"])
                working[name] = cand
                if note:
                    row["notes"] = "; ".join(x for x in (row["notes"], note) if x)
                break
            except Exception as err:  # noqa: BLE001 - one failing implementation must not end the sweep
                msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
                unsupported = isinstance(err, NotImplementedError)  # e.g. FlexAttention backward on CPU
                row.update(check="n/a" if unsupported else "error",
                           check_detail=f"{type(err).__name__}: {msg}"[:300])
                if unsupported or i == len(candidates) - 1:
                    break
        rows.append(row)
    # further rounds, implementations interleaved, so that load from other jobs on a shared CPU
    # falls on all of them alike; the row keeps the median of its rounds
    timed = [r for r in rows if r["impl"] in working and r.get("ms")]
    for r in timed:
        r["ms_rounds"] = [r["ms"]]
    for _ in range(rounds - 1):
        for r in timed:
            r["ms_rounds"].append(_timed(problem, working[r["impl"]], min_run_time / rounds, r["ms_rounds"][0] / 1e3))
    for r in timed:
        r["ms"] = statistics.median(r["ms_rounds"])
    add_ratios(rows, P.dense_flops(case))
    del problem
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: List[dict], flops: float) -> None:
    """Effective TFLOP/s (dense FLOPs x density / time), speedup vs dense and time ratio vs flex."""
    by_name = {r["impl"]: r["ms"] for r in rows if r.get("ms")}
    dense_name = next((n for n in ("sdpa-flash", "sdpa") if n in by_name),
                      next((n for n in by_name if n.startswith("sdpa")), None))
    for r in rows:
        ms, dens = r.get("ms"), r.get("density_actual")
        r["dense_impl"] = dense_name
        r["tflops"] = flops * dens / (ms * 1e-3) / 1e12 if ms and dens is not None else None
        r["speedup_vs_dense"] = by_name[dense_name] / ms if ms and dense_name else None
        r["ratio_vs_flex"] = ms / by_name["flex"] if ms and "flex" in by_name else None


def run_sweep(cases: Sequence[Case], device: torch.device, impls=None, check_rows: int = 128,
              min_run_time: float = 1.0, progress: bool = True, rounds: Optional[int] = None) -> List[dict]:
    """All rows of a sweep, with a tqdm bar over cases unless ``progress`` is False."""
    if impls:
        check_impls(impls)
    needs_bwd = any(c.mode == "fwdbwd" for c in cases)
    backward = backward_status(device) if needs_bwd else None
    bar = None
    if progress:
        from .report import progress_bar

        bar = progress_bar(total=len(cases), desc="bench", unit="case")
    rows = []
    for case in cases:
        if bar is not None:
            bar.set_description(case.label())
        rows += run_case(case, device, impls, check_rows, min_run_time, backward, bar, rounds)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows
