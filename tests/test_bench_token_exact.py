"""The token-exact benchmark rows (packed documents, sliding window) check against fp64 before timing."""

import pytest
import torch

from sparse_attn.bench import Case, run_case
from sparse_attn.bench import problems as P


@pytest.mark.parametrize("case", [Case(seq_len=512, heads=2, head_dim=32, kind="document", docs=5, causal=True),
                                  Case(seq_len=512, heads=2, head_dim=32, kind="window", window=70, causal=True),
                                  Case(seq_len=300, heads=2, head_dim=32, kind="window", window=40)],
                         ids=["document-causal", "window-causal", "window"])
def test_token_exact_rows_check_ok(case):
    rows = run_case(case, torch.device("cpu"), impls=["ours", "sdpa"], min_run_time=0.01, rounds=1)
    assert [r["check"] for r in rows] == ["ok", "ok"], rows
    mask, mask_mod = P.token_exact_mask(case, "cpu")
    i, j = torch.arange(case.seq_len)[:, None], torch.arange(case.seq_len)[None]
    tok = mask_mod(0, 0, i, j)
    assert torch.equal(mask.to_dense(causal=case.causal)[0, 0], tok)  # mask and flex mask_mod agree
    assert rows[0]["density_actual"] == pytest.approx(mask.density(causal=case.causal))
