"""README's "Supported models" table is checked against the adapters and the test builders both ways, so the
table, the code and the tests cannot drift apart: every class or pattern it lists is supported and built by a test
here, and every supported class or pattern is listed."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from models import BACKBONE_BUILDERS, MATRIX, OFF_MATRIX_BUILDERS, build
from optimum_isoprune.adapters import ADAPTERS

README = Path(__file__).resolve().parents[1] / "README.md"


def _column(index: int) -> set[str]:
    """The backquoted names in one column of the table (1: transformers, 2: timm)."""
    section = README.read_text(encoding="utf-8").split("## Supported models", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")][1:]  # minus the header
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row[index])}


def _supported(attribute: str) -> dict[str, str]:
    """Name -> key over every adapter's `model_types` (transformers) or `timm_classes` (timm class -> patterns)."""
    names = {}
    for adapter in ADAPTERS:
        for key, listed in getattr(adapter, attribute, {}).items():
            names.update({name.strip(): key for name in listed.split(",")})
    return names


@cache
def _built_classes() -> frozenset[str]:
    """`module.Class` of every model the test suite builds (the support matrix and the per-family tests)."""
    names = {*MATRIX, *OFF_MATRIX_BUILDERS, *BACKBONE_BUILDERS}
    models = [build(name) for name in sorted(names)]
    inner = [getattr(m, "timm_model", None) for m in models]  # TimmWrapperForImageClassification: its timm model too
    return frozenset(f"{type(m).__module__}.{type(m).__name__}" for m in models + [i for i in inner if i is not None])


def test_transformers_column_lists_exactly_the_supported_classes():
    assert _column(1) == set(_supported("model_types"))


def test_timm_column_lists_exactly_the_supported_patterns():
    assert _column(2) == set(_supported("timm_classes"))


def test_every_listed_transformers_class_is_built_by_the_tests():
    built = {name.rsplit(".", 1)[1] for name in _built_classes() if name.startswith("transformers.")}
    assert _column(1) - built == set()


def test_every_listed_timm_pattern_is_built_by_the_tests():
    timm_classes = _supported("timm_classes")
    untested = {pattern for pattern in _column(2) if timm_classes.get(pattern) not in _built_classes()}
    assert untested == set()
