"""Every ```python block of README.md and docs/*.md runs on CPU.

Each block runs by itself, in a fresh namespace and a fresh temporary working directory, so that
a reader can copy any one block and run it (a block that needs names from an earlier one fails).
A block is skipped only when the line before its opening fence is ``<!-- no-test -->``
(kept for GPU-only snippets).
"""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARK = "<!-- no-test -->"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(text: str):
    """[(line number, code, skipped)] of the ```python blocks in ``text``."""
    blocks = []
    for match in FENCE.finditer(text):
        line_no = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").splitlines()
        skipped = bool(before) and before[-1].strip() == SKIP_MARK
        blocks.append((line_no, match.group(1), skipped))
    return blocks


DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


def test_each_block_runs_in_a_fresh_namespace(tmp_path, monkeypatch):
    """A block that uses a name defined by an earlier block of the same file fails."""
    doc = tmp_path / "doc.md"
    doc.write_text("```python\nx = 1\n```\n\n```python\nprint(x)\n```\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"doc.md, block at line 5 failed: NameError: name 'x' is not defined"):
        test_python_blocks_run(doc, tmp_path / "run", monkeypatch)


def test_block_parser():
    text = "a\n```python\nx = 1\n```\n<!-- no-test -->\n```python\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n", False), (6, "y = 2\n", True)]


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_python_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    if not any(not skipped for _, _, skipped in blocks):
        pytest.skip(f"{path.name} has no python blocks to run")
    for line_no, code, skipped in blocks:
        if skipped:
            continue
        workdir = tmp_path / f"block_{line_no}"
        workdir.mkdir(parents=True)
        monkeypatch.chdir(workdir)
        namespace = {"__name__": f"docs_{path.stem}_{line_no}"}  # fresh: a block never sees another's names
        try:
            exec(compile(code, f"{path.name}:{line_no}", "exec"), namespace)  # noqa: S102 - docs are our own code
        except Exception as err:  # report the file and line of the failing block
            raise AssertionError(f"{path.relative_to(ROOT)}, block at line {line_no} failed: "
                                 f"{type(err).__name__}: {err}") from err
