"""README.md: every Python block runs (in order, one namespace, offline), the set-up is exactly two commands,
and every `optimum-isoprune` command line it shows parses."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from optimum_isoprune.cli import build_parser
from optimum_isoprune.data import FASHION_MNIST_DIR

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text(encoding="utf-8")) if lang == language]


def test_readme_has_python_blocks():
    assert len(blocks("python")) >= 4


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian's dataset-fashion-mnist is not installed (make demo / .ci/run install it)",
)
def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for index, code in enumerate(blocks("python")):
        try:
            exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as err:  # name the block in the failure
            raise AssertionError(f"README.md python block {index + 1} failed: {type(err).__name__}: {err}") from err
    assert (tmp_path / "out" / "vit-half" / "README.md").is_file()


def test_exactly_two_setup_commands():
    commands = [line.split("#")[0].strip() for b in blocks("bash") for line in b.splitlines()]
    assert [c for c in commands if c.startswith("make")] == ["make demo", "make test"]


def test_make_targets_exist():
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), target


def test_cli_lines_parse():
    parser = build_parser()
    lines = [line.split("  #")[0].strip() for b in blocks("bash") for line in b.splitlines()]
    lines = [line for line in lines if line.startswith("optimum-isoprune ")]
    assert len(lines) >= 6
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        assert args.command in {"prune", "distill", "evaluate", "push", "export", "demo"}, line


def test_no_placeholder_left():
    text = README.read_text(encoding="utf-8")
    assert "DEMO_RESULTS_TABLE" not in text and "TODO" not in text
