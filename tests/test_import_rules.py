"""The import rules between the project's packages (docs/ARCHITECTURE.md, "Packages and import rules").

import-linter checks the contracts in pyproject.toml ([tool.importlinter]); the AST check below refuses a
private name (``_x``) imported from another top-level package, which import-linter does not look at.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wire", "agent", "controller", "simulations", "slmfleet", "benchmarks")


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in done.stdout, done.stdout


def test_contracts_state_the_readme_rules() -> None:
    """The rules the README and docs/ARCHITECTURE.md state are the ones checked (not weaker ones)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    forbidden = {
        source: set(c["forbidden_modules"])
        for c in contracts
        if c["type"] == "forbidden" and not c.get("allow_indirect_imports")
        for source in c["source_modules"]
    }
    assert forbidden["wire"] >= {"agent", "controller", "simulations", "slmfleet"}
    assert forbidden["agent"] >= {"controller", "simulations", "slmfleet"}
    assert forbidden["controller"] >= {"simulations", "slmfleet"}


def private_imports(source: str, package: str) -> list[str]:
    """``module:name`` of each private name (or module) that ``source``, in ``package``, imports from another
    of the project's top-level packages."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if top not in PACKAGES or top == package:
                continue
            if any(part.startswith("_") and not part.startswith("__") for part in node.module.split(".")):
                found.append(node.module)
            found += [
                f"{node.module}:{alias.name}"
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            ]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in PACKAGES and parts[0] != package and any(p.startswith("_") for p in parts[1:]):
                    found.append(alias.name)
    return found


def test_no_private_names_across_packages() -> None:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            found += [f"{path.relative_to(ROOT)}: {name}" for name in private_imports(path.read_text(), package)]
    assert not found, "private names imported across packages:\n" + "\n".join(found)


def test_private_import_check_sees_what_it_must() -> None:
    source = (
        "from controller.broker.embedded import EmbeddedBroker, _die_with_parent\n"
        "from controller._internal import x\n"
        "import agent._hidden.mod\n"
        "from agent import __version__\n"
        "from simulations.runner import _own\n"
    )
    assert private_imports(source, "simulations") == [
        "controller.broker.embedded:_die_with_parent",
        "controller._internal",
        "agent._hidden.mod",
    ]
