"""Layers import only downward and nothing imports in a loop (pyproject.toml's contracts)."""

from __future__ import annotations

import re
import tomllib

import grimp
from importlinter.cli import lint_imports

from tests import REPO

PYPROJECT = REPO / "pyproject.toml"
CONFIG = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]


def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*CONFIG["root_packages"], cache_dir=None)


def test_the_import_contracts_hold() -> None:
    # Prints the broken contracts (captured by pytest, shown on failure).
    assert lint_imports(config_filename=str(PYPROJECT), no_cache=True) == 0


def test_every_module_has_a_layer() -> None:
    (layers,) = [c["layers"] for c in CONFIG["contracts"] if c["type"] == "layers"]
    placed = {name.strip() for layer in layers for name in re.split(r"[:|]", layer)}
    unplaced = sorted(
        module
        for module in graph().modules
        if module not in CONFIG["root_packages"]
        and not any(module == p or module.startswith(p + ".") for p in placed)
    )
    assert not unplaced, f"give these modules a layer in pyproject.toml: {unplaced}"


def test_no_module_imports_itself_through_others() -> None:
    # acyclic_siblings sees loops inside one package; this sees them across packages
    # too (modules of one layer may import each other).
    imports = graph()
    loops = [
        (module, *chain)
        for module in sorted(imports.modules)
        for imported in sorted(imports.find_modules_directly_imported_by(module))
        if (chain := imports.find_shortest_chain(importer=imported, imported=module))
    ]
    shown = "\n".join(" -> ".join(loop) for loop in loops[:10])
    assert not loops, f"{len(loops)} import loops, among them:\n{shown}"
