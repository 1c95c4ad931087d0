"""Every hook is documented and exercised by a test (datasette's rule): a new hook without both fails here."""

import inspect
import re
from pathlib import Path

import pytest

from sdcore import hookspecs

HOOKS = sorted(
    name for name, value in vars(hookspecs).items()
    if callable(value) and hasattr(value, "sdcore_spec")
)
TESTS = Path(__file__).parent
OWN = Path(__file__).name


def test_there_are_hooks():
    assert "run_generation" in HOOKS and "register_model_families" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc) >= 60, f"hook {hook} needs a docstring saying when it fires, its arguments and result"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    pattern = re.compile(rf"\b{hook}\b")
    files = [p for p in TESTS.rglob("test_*.py") if p.name != OWN]
    assert any(pattern.search(p.read_text(encoding="utf-8")) for p in files), f"no test mentions hook {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_family_prefix(hook):
    assert hook.split("_")[0] in {"register", "prepare", "encode", "run", "before", "after", "on", "load"}
