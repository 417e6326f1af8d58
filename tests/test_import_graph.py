"""graftc's own modules import each other without cycles, and almost only at module top level.

The graph is read from the source with `ast` (every import statement, also those inside functions), so an import
cycle that a function-level import hides at run time still shows. An import of a.b.c is an edge to a.b.c and, as Python
runs them first, to the packages a and a.b, except the importer's own packages (a package's __init__ importing its own
modules is the usual layout, not a cycle). A module imported by a computed name (`importlib.import_module`) is invisible
to `ast`, so such imports of graftc modules are not allowed, except graftc.passes' discovery of its own modules, which
the graph shows as edges from graftc.passes to each of them.
`python tests/test_import_graph.py` prints the cycles, the function-level imports and the dynamic imports.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TOP = "graftc"
# A few function-level imports stay by design: graftc/__init__.py keeps `import graftc` light (torch-heavy modules
# load on first use), and an operator loads graftc.decode (transformers' cache classes; transformers is optional)
# only when a model decodes with a cache. The rest of the code imports at module top level.
MAX_FUNCTION_LEVEL = 10
# The one package that imports its modules by computed names: graftc.passes collects the rules of all of them (none
# imports graftc.passes itself, which the graph checks, so discovery is no cycle).
DISCOVERS = "graftc.passes"


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, as setuptools maps them: by the longest prefix package-dir names (graftc.passes lives
    in passes/, graftc.kernels.hyena in kernels/hyena/)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = config.get("package-dir", {})

    def folder(name: str) -> Path:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in dirs:
                return ROOT / dirs[prefix] / "/".join(parts[cut:])
        return ROOT / "/".join(parts)

    return {name: folder(name) for name in config["packages"]}


def modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the graftc package."""
    found = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The graftc modules an import statement loads (a name imported from a package counts as its submodule
    when there is one, else as the package)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
        return [t for t in targets if t in known]
    if node.level:  # relative: from the module's own package, one level up per extra dot
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base != TOP and not base.startswith(TOP + "."):
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in known else base)
    return [t for t in out if t in known]


def _ancestors(module: str) -> list[str]:
    """The packages Python runs before `module`: a, a.b for a.b.c."""
    parts = module.split(".")
    return [".".join(parts[:cut]) for cut in range(1, len(parts))]


def _dynamic(node: ast.AST) -> bool:
    """Whether `node` imports a module by a computed name that can be one of graftc's: an `import_module` or
    `__import__` call given a name built from `__name__`/`__package__` or text naming graftc, or a relative name
    (`package=`). A name that is only a variable (a user's `python:MODULE`) is not graftc's."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if called not in ("import_module", "__import__") or not node.args:
        return False
    if any(k.arg == "package" for k in node.keywords):
        return True
    for part in ast.walk(node.args[0]):
        if isinstance(part, ast.Name) and part.id in ("__name__", "__package__"):
            return True
        if isinstance(part, ast.Constant) and isinstance(part.value, str) and (
                part.value.startswith(".") or part.value == TOP or part.value.startswith(TOP + ".")):
            return True
    return False


def _walk(tree: ast.AST, in_function: bool = False):
    """(import node, whether it sits inside a function body) for every import statement."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk(child, inside)


def import_graph() -> tuple[nx.DiGraph, list[tuple[str, int, str]], list[tuple[str, int]]]:
    """The module import graph, (file, line, imported modules) for every function-level import statement of graftc
    modules, and (file, line) for every import of a graftc module by a computed name outside graftc.passes."""
    found = modules()
    known = set(found)
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    function_level, dynamic = [], []
    for module, path in found.items():
        tree = ast.parse(path.read_text(), str(path))
        own = set(_ancestors(module)) | {module}
        for node, in_function in _walk(tree):
            targets = list(dict.fromkeys(_imported(node, module, path.stem == "__init__", known)))
            for target in targets:
                for runs in [*_ancestors(target), target]:
                    if runs not in own and runs in known:
                        graph.add_edge(module, runs, line=node.lineno)
            if in_function and targets:  # one per statement
                function_level.append((str(path.relative_to(ROOT)), node.lineno, ", ".join(targets)))
        for node in ast.walk(tree):
            if _dynamic(node):
                if module == DISCOVERS:  # it imports each of its modules
                    for sub in known:
                        if sub.rpartition(".")[0] == DISCOVERS:
                            graph.add_edge(module, sub, line=node.lineno)
                else:
                    dynamic.append((str(path.relative_to(ROOT)), node.lineno))
    return graph, function_level, dynamic


def cycles(graph: nx.DiGraph) -> list[list[str]]:
    """The groups of modules that import each other (directly or around a loop), each sorted."""
    return sorted(sorted(group) for group in nx.strongly_connected_components(graph) if len(group) > 1)


def test_graph_is_read_from_the_package_folders():
    """The graph covers passes/ and kernels/ under their package names, and sees known edges (including a
    relative import), so that an empty or misread graph cannot pass the checks below."""
    graph, _, _ = import_graph()
    assert {"graftc.cli", "graftc.passes", "graftc.passes.common", "graftc.kernels"} <= set(graph)
    assert all(path.is_file() for path in modules().values())
    dirs = package_dirs()  # a sub-package missing from pyproject's packages would be left out here (and not installed)
    unlisted = [f"{package}.{init.parent.name}" for package, folder in dirs.items() for init in folder.glob("*/__init__.py")
                if f"{package}.{init.parent.name}" not in dirs]
    assert not unlisted, f"packages missing from pyproject's [tool.setuptools] packages: {unlisted}"
    assert graph.has_edge("graftc.cli", "graftc.errors")
    assert any(target.startswith("graftc.kernels") for target in graph.successors("graftc.passes.hyena"))
    tree = ast.parse("from . import common\nfrom .. import rules\nfrom .common import x\n")
    known = {"graftc.passes.common", "graftc.rules", "graftc.passes"}
    found = [t for node in tree.body for t in _imported(node, "graftc.passes.hyena", False, known)]
    assert found == ["graftc.passes.common", "graftc.rules", "graftc.passes.common"]


def test_a_cycle_and_a_function_level_import_are_found():
    """The detector itself: a hidden (function-level) import back makes a cycle and is counted."""
    tree = ast.parse("import os\ndef f():\n    from graftc import a\n    return a\n")
    assert [(type(n).__name__, inside) for n, inside in _walk(tree)] == [("Import", False), ("ImportFrom", True)]
    graph = nx.DiGraph([("graftc.a", "graftc.b"), ("graftc.b", "graftc.a"), ("graftc.b", "graftc.c")])
    assert cycles(graph) == [["graftc.a", "graftc.b"]]


def test_package_inits_and_dynamic_imports_are_seen():
    """Importing a.b.c runs a.b's __init__ (an edge, but not to the importer's own packages); graftc.passes'
    discovery is edges to its modules; a computed import of a graftc module is found, a user's module name is not."""
    graph, _, _ = import_graph()
    assert graph.has_edge("graftc.cli", "graftc.distill")  # cli imports graftc.distill.data (and graftc.distill)
    assert not graph.has_edge("graftc.distill.stage1", "graftc.distill")  # its own package
    assert graph.has_edge("graftc.passes", "graftc.passes.hyena")
    assert not any(graph.has_edge(m, "graftc.passes") for m in graph if m.startswith("graftc.passes."))
    calls = ["importlib.import_module(f'{__name__}.{name}')", "import_module('graftc.spec')",
             "importlib.import_module('.dit', package=__package__)", "__import__('graftc.' + name)",
             "importlib.import_module(module_name)", "importlib.import_module('timm')"]
    found = [_dynamic(ast.parse(call).body[0].value) for call in calls]
    assert found == [True, True, True, True, False, False]


def test_no_import_cycles():
    graph, _, _ = import_graph()
    found = cycles(graph)
    assert not found, "import cycles among graftc modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_dynamic_imports_of_graftc_modules():
    _, _, dynamic = import_graph()
    assert not dynamic, "graftc modules imported by a computed name (the graph cannot see them): " + \
        ", ".join(f"{path}:{line}" for path, line in dynamic)


def test_few_function_level_imports():
    _, function_level, _ = import_graph()
    listing = "\n".join(f"{path}:{line}: {target}" for path, line, target in function_level)
    assert len(function_level) <= MAX_FUNCTION_LEVEL, \
        f"{len(function_level)} function-level imports of graftc modules (at most {MAX_FUNCTION_LEVEL}):\n{listing}"


if __name__ == "__main__":
    graph, function_level, dynamic = import_graph()
    for group in cycles(graph):
        print("cycle:", " <-> ".join(group))
        for a, b in graph.subgraph(group).edges:
            print(f"    {a} -> {b} (line {graph.edges[a, b]['line']})")
    print(f"{len(function_level)} function-level imports of graftc modules:")
    for path, line, target in function_level:
        print(f"    {path}:{line}: {target}")
    for path, line in dynamic:
        print(f"dynamic import of a graftc module: {path}:{line}")
    sys.exit(1 if cycles(graph) or dynamic or len(function_level) > MAX_FUNCTION_LEVEL else 0)
