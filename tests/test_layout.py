"""The package's layout rules (see docs/design.md, "Where helpers live"): no private name crosses
from one subpackage into another, the import graph has no cycle (lazy imports included), and
the package is found by ordinary discovery (no ``package-dir`` mapping)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mtl_optim"


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(module: str) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every import anywhere in ``module``."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mtl_optim":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "mtl_optim"]
    return found


def _subpackage(module: str) -> str | None:
    """The subpackage a module belongs to (``aggregators``, ...); None for top-level modules."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and MODULES[module].name == "__init__.py"):
        return parts[1]
    return None


def test_no_private_name_crosses_subpackages():
    bad = []
    for module in MODULES:
        for target, name in _imports(module):
            theirs = _subpackage(target) if target in MODULES else None
            if theirs is None or theirs == _subpackage(module):
                continue
            private_module = any(p.startswith("_") for p in target.split(".")[2:])
            if private_module or (name is not None and name.startswith("_")):
                bad.append(f"{module} imports {target}{'' if name is None else '.' + name}")
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    graph = {m: {t for t, _ in _imports(m) if t in MODULES} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                return [*path, module, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, module])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(MODULES):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle)


def test_the_package_is_found_by_discovery_without_a_package_dir_mapping():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "package-dir" not in pyproject
    assert 'include = ["mtl_optim*"]' in pyproject
    assert not (ROOT / "kernels").exists()  # the kernels live inside the package
    assert "mtl_optim.kernels" in MODULES
