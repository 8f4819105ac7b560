"""The house rules that import-linter cannot state: no module over 600 lines and no
class over 450, so that no room grows back into the giants this layout cut apart;
and tests/unit mirrors the package."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness.stack import REPO

PACKAGE = REPO / "daemon" / "ssw"
UNIT_TESTS = REPO / "tests" / "unit"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 450
# Tests of rules that span the tree: this file, and every id and name pattern ssw accepts.
CROSS_CUTTING = {"house", "ids"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "egg-info" not in str(p))


def test_no_module_is_over_600_lines() -> None:
    too_long = {
        str(p.relative_to(REPO)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (cut them along their chapters): {too_long}"


def test_no_class_is_over_450_lines() -> None:
    too_long: dict[str, int] = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_long[f"{path.relative_to(REPO)}:{node.name}"] = length
    assert not too_long, f"classes over {MAX_CLASS_LINES} lines (give them pieces): {too_long}"


def test_unit_tests_mirror_the_package() -> None:
    """tests/unit/<package path>/test_<module>.py for a module's own tests: a test module
    outside the mirror, or named after no module there, is misplaced."""
    stray = []
    for test in sorted(UNIT_TESTS.rglob("test_*.py")):
        folder = PACKAGE / test.parent.relative_to(UNIT_TESTS)
        module = test.stem.removeprefix("test_")
        if test.parent == UNIT_TESTS and module in CROSS_CUTTING:
            continue
        if not (folder / f"{module}.py").exists() and not (folder / module / "__init__.py").exists():
            stray.append(str(test.relative_to(REPO)))
    assert not stray, f"unit tests with no module of that name where they sit: {stray}"
