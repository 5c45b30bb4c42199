"""The ``sparse-attn`` command: bench (tiny sweep), inspect, patterns, and the benchmark checks."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_attn import BlockSparseMask
from sparse_attn.bench import Case, run_case
from sparse_attn.bench import problems as P
from sparse_attn.bench import runner
from sparse_attn.cli import _bar_summary, ascii_map, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--sweep", "tiny", "--seq-lens", "128,192", "--densities", "0.5,1.0", "--heads", "1", "--head-dims", "16",
        "--block", "32", "--min-run-time", "0.02", "--check-rows", "16", "--no-progress"]
HEADER_KEYS = ("cpu", "gpu", "torch", "triton", "sparse_attn", "git_commit", "date_utc", "command")


def test_bench_tiny_writes_table_csv_json_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plots need the bench extra (matplotlib)")
    rc = main(["bench", *TINY, "--impls", "ours,sdpa", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    payload = json.loads((tmp_path / "results.json").read_text())
    assert all(payload["machine"][k] for k in HEADER_KEYS)
    rows = payload["rows"]
    assert [r["impl"] for r in rows] == ["ours", "sdpa"] * 4
    assert all(r["check"] == "ok" and r["ms"] > 0 for r in rows), [(r["impl"], r["check_detail"]) for r in rows]
    assert all(r["speedup_vs_dense"] > 0 and r["tflops"] > 0 for r in rows)
    assert all(len(r["ms_rounds"]) == 3 for r in rows)  # CPU default: 3 interleaved rounds, median reported
    csv_text = (tmp_path / "results.csv").read_text().splitlines()
    header = {ln[2:].split(":", 1)[0] for ln in csv_text if ln.startswith("# ")}
    assert set(HEADER_KEYS) <= header
    assert csv_text[len(header)].startswith("seq_len,")
    assert (tmp_path / "results.md").read_text().startswith("| L | H | D |")
    for png in ("speed_vs_length.png", "speedup_vs_density.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_flex_row_on_the_identical_mask(capsys):
    """Default implementations on CPU: ours, dense SDPA and compiled FlexAttention (one shape: one compile)."""
    rc = main(["bench", *TINY, "--seq-lens", "128", "--densities", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("128 ")]
    assert [ln.split()[6] for ln in lines] == ["ours", "sdpa", "flex"]
    assert all(ln.rstrip().endswith("ok") for ln in lines), lines
    ours = lines[0].split()
    assert ours[-2].endswith("x") and float(ours[-2][:-1]) > 0  # time ratio vs flex


def test_wrong_kernel_is_marked_and_fails_the_command(monkeypatch, capsys):
    """A fast wrong kernel must not look good: ours replaced by dense attention (mask ignored)."""
    def ignores_mask(q, k, v, mask=None, **kw):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(runner, "sparse_attention", ignores_mask)
    rc = main(["bench", *TINY, "--seq-lens", "128", "--densities", "0.5", "--impls", "ours,sdpa"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "WRONG" in captured.out and "failed the check" in captured.err


def test_nan_outside_the_sampled_rows_is_caught(monkeypatch):
    right = runner.sparse_attention

    def nan_tail(q, k, v, mask=None, **kw):
        o = right(q, k, v, mask, **kw).clone()
        o[:, :, -40:-2] = float("nan")  # spares the first and last rows, which are always sampled
        return o
    monkeypatch.setattr(runner, "sparse_attention", nan_tail)
    case = Case(seq_len=256, heads=1, head_dim=16, density=0.5, block=32)
    rows = run_case(case, torch.device("cpu"), impls=["ours"], check_rows=4, min_run_time=0.02)
    assert rows[0]["check"] == "WRONG" and "non-finite" in rows[0]["check_detail"]


def test_fwdbwd_rows_check_gradients(monkeypatch):
    case = Case(seq_len=96, heads=2, head_dim=16, density=0.5, block=32, mode="fwdbwd")
    rows = run_case(case, torch.device("cpu"), impls=["ours", "sdpa"], check_rows=8, min_run_time=0.02)
    assert [r["check"] for r in rows] == ["ok", "ok"], [r["check_detail"] for r in rows]
    # a kernel with a right forward and a wrong backward is caught by the gradient check
    right = runner.sparse_attention

    def bad_grad(q, k, v, mask=None, **kw):
        o = right(q, k, v, mask, **kw)
        return o + (q - q.detach()) * 0.5  # same value, extra gradient into q
    monkeypatch.setattr(runner, "sparse_attention", bad_grad)
    rows = run_case(case, torch.device("cpu"), impls=["ours"], check_rows=8, min_run_time=0.02)
    assert rows[0]["check"] == "WRONG" and rows[0]["check_detail"].startswith("dq")


def test_stripe_rows_when_the_stripe_kernel_exists():
    if runner.stripe_mask_class() is None:
        rows = run_case(Case(seq_len=128, kind="stripe", verticals=4, slashes=4), torch.device("cpu"))
        assert all(r["check"] == "n/a" and "stripe" in r["check_detail"] for r in rows)
        return
    case = Case(seq_len=160, heads=2, head_dim=16, kind="stripe", verticals=5, slashes=7, block=32, causal=True)
    rows = run_case(case, torch.device("cpu"), impls=["ours", "sdpa"], check_rows=16, min_run_time=0.02)
    assert [r["impl"] for r in rows] == ["ours", "ours-blocks", "sdpa"]
    assert all(r["check"] == "ok" for r in rows), [r["check_detail"] for r in rows]


def test_stripe_helpers_match_brute_force():
    case = Case(seq_len=70, heads=2, kind="stripe", verticals=3, slashes=5, block=16)
    vertical, slash = P.stripe_indices(case, "cpu")
    is_vert, is_slash = P.stripe_tables(vertical, slash, case.seq_len)
    rows = torch.arange(case.seq_len)
    keep = P.stripe_keep_rows(is_vert, is_slash, rows, case.seq_len)[0]  # [H, L, L]
    for h in range(case.heads):
        cols, offs = set(vertical[0, h].tolist()), set(slash[0, h].tolist())
        brute = torch.tensor([[j in cols or (i - j) in offs for j in range(70)] for i in range(70)])
        assert torch.equal(keep[h], brute)
    cover = P.stripe_cover_mask(is_vert, is_slash, case).to_dense()[0]
    assert bool((cover | ~keep).all())  # every kept pair lies in a covering tile


def test_random_block_mask_hits_the_density():
    case = Case(seq_len=64 * 40, heads=3, density=0.1, block=64)
    mask = P.random_block_mask(case, "cpu")
    assert mask.counts.unique().tolist() == [4]
    assert mask.density() == pytest.approx(0.1)


def test_bar_summary_reports_the_ratio():
    base = dict(device="cpu", seq_len=8192, heads=8, head_dim=64, block=64, density=0.1, causal=False, mode="fwd",
                kind="block", check="ok")
    line = _bar_summary([dict(base, impl="ours", speedup_vs_dense=2.0), dict(base, impl="sdpa")])
    assert "2.00x" in line and "MISSED (needs 2.0x more speed)" in line
    assert "issue" not in line.lower() and line.startswith("CPU speed target, block-sparse forward at L=8192")
    assert "-> met" in _bar_summary([dict(base, impl="ours", speedup_vs_dense=5.0)])
    assert "NOT MET" in _bar_summary([dict(base, impl="ours", speedup_vs_dense=5.0, check="WRONG")])


def test_inspect_writes_png_and_ascii(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="inspect draws with matplotlib (bench extra)")
    png = tmp_path / "mask.png"
    rc = main(["inspect", "random-blocks", "--seq-len", "256", "--block", "32", "--density", "0.25",
               "--out", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[batch 0, head 1]" in out and "8x8 tiles" in out


def test_inspect_a_registered_pattern(tmp_path, capsys):
    from sparse_attn.cli import _registry

    pytest.importorskip("matplotlib", reason="inspect draws with matplotlib (bench extra)")
    get_pattern, names = _registry()
    if "sliding_window" not in names:
        pytest.skip("pattern layer without sliding_window")
    rc = main(["inspect", "sliding_window", "--seq-len", "512", "--param", "left=64", "--param", "right=0",
               "--causal", "--out", str(tmp_path / "sw.png")])
    assert rc == 0 and (tmp_path / "sw.png").exists()


@pytest.mark.parametrize("args,expected", [(["--dtypes", "bf16"], "dtype must be one of"),
                                           (["--densities", "0"], "density must be in"),
                                           (["--impls", "ours,sdpa-foo"], "unknown ['sdpa-foo']"),
                                           (["--quick", "--sweep", "cpu"], "not both"),
                                           (["--sweep", "nope"], "sweep must be one of")])
def test_bench_bad_options_say_what_is_wrong(args, expected):
    with pytest.raises(SystemExit, match=re.escape(expected)):
        main(["bench", *args])


def test_inspect_unknown_name_lists_the_choices(capsys):
    assert main(["inspect", "no-such-pattern"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-attn inspect: pattern must be one of [") and "random-blocks" in err


@pytest.mark.parametrize("args,expected", [
    (["sliding_window", "--param", "left=abc"], "--param for sliding_window: left must be an int, got str ('abc')"),
    (["sliding_window", "--param", "nosuch=1"], "--param for sliding_window:"),
    (["window_3d", "--layout", "{not json"], "--layout must be a TokenLayout as JSON"),
])
def test_inspect_bad_options_exit_2_with_a_message(args, expected, capsys):
    assert main(["inspect", *args, "--seq-len", "256"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-attn inspect: ") and expected in err and "Traceback" not in err


def test_inspect_prints_one_density_per_head_labelled(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="inspect draws with matplotlib (bench extra)")
    from sparse_attn.bench.problems import random_block_mask
    from sparse_attn.bench.sweeps import Case
    from sparse_attn.cli import DENSITY_LABEL

    length, block = 512, 64
    rc = main(["inspect", "random-blocks", "--seq-len", str(length), "--block", str(block), "--density", "0.25",
               "--out", str(tmp_path / "m.png")])
    out = capsys.readouterr().out
    assert rc == 0 and "density=" not in out and "kept share" not in out
    mask = random_block_mask(Case(seq_len=length, heads=2, head_dim=64, density=0.25, block=block), "cpu", 0)
    tiles = (length // block) ** 2  # whole tiles: kept pairs / all pairs = kept tiles / all tiles
    for h in range(2):
        expected = mask.counts[0, h].sum().item() / tiles
        lines = [ln for ln in out.splitlines() if ln.startswith(f"[batch 0, head {h}]")]
        assert lines == [f"[batch 0, head {h}] {DENSITY_LABEL}: {expected:.1%}"]
    assert len(re.findall(r"\d%", out)) == 2  # one density per drawn head, nothing else in percent


def test_inspect_causal_density_counts_causally_visible_pairs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="inspect draws with matplotlib (bench extra)")
    from sparse_attn.cli import DENSITY_LABEL

    length = 256  # "full" keeps every tile: under --causal that is every visible pair, density 100%
    assert main(["inspect", "full", "--seq-len", str(length), "--causal", "--out", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert f"[batch 0, head 0] {DENSITY_LABEL}: 100.0%" in out and "causally visible" in out


def test_patterns_names_are_checked(capsys):
    pytest.importorskip("sparse_attn.patterns.synthetic")
    assert main(["patterns", "--seq-len", "256", "--names", "nosuch,sliding_window"]) == 2
    err = capsys.readouterr().err
    assert "unknown pattern name(s) ['nosuch']; registered patterns: [" in err and "'kmeans_routing'" in err
    assert main(["patterns", "--seq-len", "256", "--names", "kmeans_routing", "--no-progress"]) == 0
    assert "kmeans_routing" in capsys.readouterr().out


def test_ascii_map_pools_large_maps():
    text = ascii_map(torch.eye(200), width=50)
    assert "4x4 tiles per character" in text
    assert len(text.splitlines()) == 1 + 50


def test_patterns_command(capsys):
    try:
        import sparse_attn.patterns.synthetic  # noqa: F401
    except ImportError:
        assert main(["patterns", "--seq-len", "256"]) == 2
        assert "pattern layer" in capsys.readouterr().err
        return
    assert main(["patterns", "--seq-len", "256", "--names", "sliding_window"]) == 0
    out = capsys.readouterr().out
    assert "sliding_window" in out and "recall" in out


def test_list_sweeps_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "sparse_attn", "bench", "--list-sweeps"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "quick-cpu" in proc.stdout and "gpu-check" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_check_without_cuda_says_so():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "sparse-attn bench --quick" in proc.stderr


def test_gpu_check_flow_on_cpu(tmp_path, capsys, monkeypatch):
    """The whole script (sections, budget, table, bars, files) on a one-case sweep; on CPU only for this test."""
    from sparse_attn.bench import sweeps

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    # the shape of test_bench_flex_row_on_the_identical_mask: FlexAttention is compiled once for both
    monkeypatch.setitem(sweeps.SWEEPS, "one", [Case(seq_len=128, heads=1, head_dim=16, density=0.5, block=32)])
    rc = gpu_check.main(["--device", "cpu", "--skip-tests", "--sweeps", "one", "--out", str(tmp_path),
                         "--routing-length", "512", "--decode-contexts", "2048"])  # (128k decode rows: minutes)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ours/sdpa" in out and "did not produce checked timings" in out
    assert "routing bar (L=512" in out and "warm build, 2 iters" in out
    assert "bar: ours loki at 2048 keys" in out and "decode rows: error" not in out  # section 6 ran (token lists)
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = saved["rows"]
    assert {r["impl"] for r in rows} == {"ours", "sdpa", "flex"} and all(r["check"] == "ok" for r in rows)
    assert [r["ms"] > 0 for r in saved["routing_bar"]] == [True] * 3


def test_gpu_check_compact_table():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    rows = run_case(Case(seq_len=96, heads=1, head_dim=16, density=0.5, block=32), torch.device("cpu"),
                    impls=["ours", "sdpa"], check_rows=8, min_run_time=0.02)
    for r in rows:
        r["impl"] = "sdpa-flash" if r["impl"] == "sdpa" else r["impl"]
    table = gpu_check.compact(rows)
    assert "ours/sdpa" in table and table.splitlines()[-1].endswith("ok")
