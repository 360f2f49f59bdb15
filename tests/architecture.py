"""The package's import graph, read from the source (no import runs): what tests/test_architecture.py
checks against the layers of docs/architecture.md."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fcr"

# Layers, bottom first: a module imports only its own layer or lower ones.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fcr.paths", "fcr.files", "fcr.contract", "fcr.options", "fcr.config", "fcr.machine", "fcr.stats",
     "fcr.plots", "fcr.study_design", "fcr.grid_design", "fcr.manifest", "fcr.markers"),
    ("fcr.core",),
    ("fcr.backends",),
    ("fcr.eval",),
    ("fcr.analysis",),
    ("fcr.train", "fcr.experiments", "fcr.diffusers_cache", "fcr.human"),
    ("fcr.report",),
    ("fcr.pipeline", "fcr.stage", "fcr.verify", "fcr.notebooks", "fcr.__main__"),
)
# The report formats tables: besides layer 0 it reads only the analysis modules that compute on tables.
REPORT_MAY_IMPORT = ("fcr.analysis.rows", "fcr.stats", "fcr.analysis.quality_cost",
                     "fcr.analysis.robustness_criterion", "fcr.analysis.human_preference")


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


@cache
def imports(module_level_only: bool) -> dict[str, set[str]]:
    """{module: the fcr modules it imports} (``module_level_only``: what importing it runs; else
    function-level imports too)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        found: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.If) and module_level_only:  # if TYPE_CHECKING: runs nothing
                continue
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        graph[name] = {_owner(m, files) for m in found if m == "fcr" or m.startswith("fcr.")} - {name, None}
    return graph


def _owner(name: str, files: dict[str, Path]) -> str | None:
    """The module that ``name`` (a module or a name imported from one) lives in."""
    while name not in files and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in files else None


def layer_of(module: str) -> int:
    """The index of the layer a module belongs to (the longest matching prefix; the package's own
    ``__init__`` is layer 0; -1: a module no layer names)."""
    if module == "fcr":
        return 0
    best, index = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, index = len(p), i
    return index


def longest_chain() -> list[str]:
    """The longest chain of module-level imports inside the package."""
    graph = imports(True)
    memo: dict[str, list[str]] = {}

    def walk(module: str, seen: tuple[str, ...]) -> list[str]:
        if module in memo:
            return memo[module]
        best = [module]
        for dep in graph.get(module, ()):
            if dep not in seen:
                chain = [module, *walk(dep, (*seen, module))]
                best = chain if len(chain) > len(best) else best
        memo[module] = best
        return best

    return max((walk(m, ()) for m in graph), key=len)
