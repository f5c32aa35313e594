"""The core toolkit stands without the demo: recipes and library never import ``povid_demo``."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted([*ROOT.glob("povid/**/*.py"), *ROOT.glob("povid_data/*.py"), *ROOT.glob("recipes/*.py")])


def _imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_does_not_import_the_demo_or_test_helpers(path):
    allowed = {"povid_demo.chain"} if path == ROOT / "povid" / "cli.py" else set()  # `povid demo` itself
    bad = [
        m for m in _imported_modules(path)
        if (m.split(".")[0] == "povid_demo" and m not in allowed) or m.startswith("_tiny") or m == "tests"
    ]  # fmt: skip
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_layers_exist():
    assert len(CORE) > 20 and (ROOT / "povid_demo" / "chain.py").exists()
