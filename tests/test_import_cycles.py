"""No import cycles among ess_train's modules (module-level imports, parsed with ``ast``, nothing imported).

``import a.b`` and ``from a import b`` (``b`` a module, or a name in ``a``) are edges to ``a.b`` / ``a``;
relative imports are resolved against the importing module; imports inside functions and classes (run
later, on first use) and under ``if TYPE_CHECKING:`` do not count. Importing ``a.b`` also runs ``a``'s
``__init__``, but that is not an edge: a package re-exporting its own submodules is no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ess_train"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under the package ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported: top level, and inside top-level ``if``/``try``/
    ``with`` blocks (not under ``if TYPE_CHECKING:``), never inside a function or a class."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name != "TYPE_CHECKING":
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def imports_of(module: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``module`` (its source at ``path``) imports at module level."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _module_level(ast.parse(path.read_text(), filename=str(path)).body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from a import b``: the submodule ``a.b`` when there is one, else a name defined in ``a``
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        for target in targets:
            # ``import a.b.c`` of something that is not a module of ours: its longest known prefix
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                out.add(target)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # recursion depth <= number of modules (~100)
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles_among_ess_train_modules() -> None:
    graph = import_graph()
    assert "ess_train.models.backbone" in graph and "ess_train.tasks.base" in graph
    assert "ess_train.models.mixer_registry" in graph["ess_train.models.backbone"]  # edges are found
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among ess_train modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_registry_does_not_import_the_backbone_even_lazily() -> None:
    """The old circle: ``registry.build_model`` imported ``backbone`` inside the function."""
    source = (PACKAGE / "models" / "mixer_registry.py").read_text()
    names = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(ast.parse(source))
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert not any(name and "backbone" in name for name in names), names


def test_cycle_finder_and_import_parser(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("from . import b\nimport os\n\ndef f():\n    from pkg import c\n")
    (pkg / "b.py").write_text("from .sub import d\n")
    (pkg / "c.py").write_text("from pkg.a import f\n")  # a -> c only inside a function: no cycle
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\nfrom .. import a\n"
    )
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.sub.d"}
    assert graph["pkg.sub.d"] == {"pkg.a"}  # ``from .. import a``: the submodule pkg.a
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.d"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []
