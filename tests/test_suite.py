"""The suite itself: every test asserts what it shows. A test that only calls the code shows that nothing
was raised, which passes as well for a function that returns the wrong thing."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
EXPECTATIONS = {"raises", "fail", "skip", "warns", "xfail"}  # pytest's: a refusal is asserted by raises
# Tests of a function that returns nothing, whose one outcome is not raising.
NOTHING_TO_RETURN = {"test_accepted_keys"}  # auth/keypolicy.py check_public_key


def _called(node: ast.AST) -> set[str]:
    return {call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
            for call in ast.walk(node) if isinstance(call, ast.Call)}


def _asserts(node: ast.AST) -> bool:
    return any(isinstance(sub, ast.Assert) for sub in ast.walk(node))


def silent_tests_in(path: Path) -> list[str]:
    """The test functions of `path` ("file:line name") with no assert, no pytest expectation, and no call
    of a function of the same module that asserts (a helper such as `only_clean_errors`)."""
    tree = ast.parse(path.read_text(), str(path))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    asserting = {f.name for f in functions if _asserts(f)}
    changed = True
    while changed:  # a helper that calls an asserting helper asserts too
        changed = False
        for f in functions:
            if f.name not in asserting and _called(f) & asserting:
                asserting.add(f.name)
                changed = True
    return [f"{path}:{f.lineno} {f.name}" for f in functions
            if f.name.startswith("test") and f.name not in NOTHING_TO_RETURN and not _asserts(f)
            and not _called(f) & (EXPECTATIONS | (asserting - {f.name}))]


def test_every_test_asserts_what_it_shows():
    silent = [name for path in sorted(TESTS.rglob("test_*.py")) for name in silent_tests_in(path)]
    assert silent == [], "tests that assert nothing (assert the returned value):\n" + "\n".join(silent)


def test_a_test_that_only_calls_the_code_is_found(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text("def helper(x):\n    assert x\n\n"
                      "def outer(x):\n    helper(x)\n\n"
                      "def test_silent():\n    int('1')\n\n"
                      "def test_by_helper():\n    outer(int('1'))\n\n"
                      "def test_refused():\n    with pytest.raises(ValueError):\n        int('x')\n\n"
                      "def test_direct():\n    assert int('1') == 1\n")
    assert [line.rsplit(" ", 1)[1] for line in silent_tests_in(sample)] == ["test_silent"]
