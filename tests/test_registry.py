"""The shared name registry (patterns and decode patterns), `a | b` without importing combine, and the
import paths kept when the sdpa <-> presets cycle was removed."""

import subprocess
import sys

import pytest

from sparse_attn.patterns import base, decode
from sparse_attn.patterns.registry import Registry


def test_registry_registers_gets_and_splits_configs():
    reg = Registry("widget")

    @reg.register("box")
    class Box:
        def __init__(self, side=1):
            self.side = side

    assert Box.name == "box" and reg.names() == ["box"] and "box" in reg and reg.cls("box") is Box
    assert reg.get("box", side=3).side == 3
    assert reg.split_config({"name": "box", "side": 2}) == ("box", {"side": 2})


@pytest.mark.parametrize("call, error, message", [
    pytest.param(lambda reg: reg.register("box")(type("Other", (), {})), ValueError,
                 "widget name 'box' is already registered to Box.", id="duplicate"),
    pytest.param(lambda reg: reg.get("nope"), ValueError, "unknown widget 'nope'; expected one of ['box'].",
                 id="unknown"),
    pytest.param(lambda reg: reg.get(3), TypeError, "name must be a str, got int.", id="get-not-str"),
    pytest.param(lambda reg: reg.register(3), TypeError, "name must be a str, got int.", id="register-not-str"),
    pytest.param(lambda reg: reg.split_config({"side": 2}), ValueError,
                 "a widget config must be a dict with a 'name' key", id="no-name"),
    pytest.param(lambda reg: reg.split_config([1]), ValueError, "a widget config must be a dict", id="not-dict"),
])
def test_registry_errors_name_the_argument(call, error, message):
    reg = Registry("widget")
    reg.register("box")(type("Box", (), {}))
    with pytest.raises(error) as info:
        call(reg)
    assert str(info.value).startswith(message)


def test_registry_kind_must_be_a_str():
    with pytest.raises(TypeError, match="kind must be a non-empty str"):
        Registry("")


def test_pattern_and_decode_registries_keep_their_messages():
    with pytest.raises(ValueError, match="pattern name 'dense' is already registered to Dense"):
        base.register("dense")(type("Again", (), {}))
    with pytest.raises(ValueError, match="decode pattern name 'quest' is already registered to QuestSelect"):
        decode.register_decode("quest")(type("Again", (), {}))
    with pytest.raises(ValueError, match=r"unknown decode pattern 'nope'; expected one of \['kinetics', 'loki', 'quest'\]"):
        decode.get_decode_pattern("nope")
    with pytest.raises(TypeError, match="name must be a str"):
        decode.get_decode_pattern(None)
    with pytest.raises(ValueError, match="a decode pattern config must be a dict with a 'name' key"):
        decode.decode_pattern_from_dict({"k": 4})
    pat = decode.get_decode_pattern("kinetics", k=(2, 0.5))
    assert decode.decode_pattern_from_dict(pat.to_dict()) == pat  # lists from JSON become tuples again
    assert decode.list_decode_patterns() == ["kinetics", "loki", "quest"]


def _fresh(code):
    """Run ``code`` in a new interpreter (nothing imported before it)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_or_works_when_only_a_pattern_module_is_imported():
    code = ("from sparse_attn.patterns.static import SinkLocal, SlidingWindow\n"
            "u = SinkLocal() | SlidingWindow()\n"
            "print(type(u).__module__, type(u).__name__, len(u.patterns))")
    assert _fresh(code) == "sparse_attn.patterns.combine Union 2"


def test_lse_warm_start_import_paths():
    code = ("from sparse_attn.integrations.presets import LSEWarmStart as A\n"
            "from sparse_attn.integrations.warm_start import LSEWarmStart as B\n"
            "from sparse_attn.integrations.sdpa import is_pattern, _decode_pattern\n"
            "from sparse_attn.patterns import LSEMass\n"
            "w = A(LSEMass())\n"
            "print(A is B, is_pattern(w), _decode_pattern(w.to_dict()).pattern == w.pattern)")
    assert _fresh(code) == "True True True"
