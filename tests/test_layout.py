"""The package's shape: no module imports another that (directly or not) imports it back, and the walls
between stages (``MAY_IMPORT``) hold."""

import ast

from conftest import ROOT


def rexft_imports() -> dict[str, set[str]]:
    """module -> the rexft modules it imports, at module level or inside functions alike."""
    modules = {}
    for path in (ROOT / "rexft").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or node.level):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in graph[node]:
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = rexft_imports()
    assert "rexft.config" in graph["rexft.train"]  # the walk sees real imports
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Which stage package may import which. ``rexft.inference`` (the model loader, the engines, stop strings,
# shared openings) lives below every stage that runs the trained model; those stages are peers: none
# imports another's internals. merge-export scores its fidelity table as eval does, through the names
# ``rexft.eval`` exports (its package, not its modules). Nothing below the CLI imports the CLI.
CLI = {"rexft.cli", "rexft.multirun", "rexft.__main__"}
STAGES = ("rexft.eval", "rexft.export", "rexft.serve", "rexft.harness")
MAY_IMPORT = {  # package -> the stage packages (and public entries, exact module names) it may import
    "rexft.inference": set(),
    "rexft.eval": {"rexft.inference"},
    "rexft.export": {"rexft.inference", "=rexft.eval"},
    "rexft.serve": {"rexft.inference"},
    "rexft.harness": {"rexft.inference"},
}


def package_of(module: str, packages) -> str | None:
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def crossings(graph: dict[str, set[str]]) -> list[str]:
    """Every import that crosses a wall of ``MAY_IMPORT``, or reaches the CLI from below it."""
    walled = tuple(MAY_IMPORT)
    found = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if target in CLI and module not in CLI:
                found.append(f"{module} -> {target} (below the CLI)")
            mine, theirs = package_of(module, walled), package_of(target, walled)
            if mine is None or theirs is None or mine == theirs:
                continue
            allowed = MAY_IMPORT[mine]
            if theirs not in allowed and f"={target}" not in allowed:
                found.append(f"{module} -> {target}")
    return found


def test_stages_import_inference_not_each_other():
    graph = rexft_imports()
    assert "rexft.inference.engine" in graph["rexft.eval.protocols"] | graph["rexft.inference"]  # the walk sees them
    assert crossings(graph) == []


def test_a_new_crossing_is_found():
    graph = {"rexft.serve.local": {"rexft.eval.protocols"}, "rexft.export": {"rexft.eval", "rexft.eval.pool"},
             "rexft.inference.pool": {"rexft.eval.report"}, "rexft.harness.model": {"rexft.cli"},
             "rexft.eval.stage": {"rexft.inference"}}
    assert crossings(graph) == ["rexft.export -> rexft.eval.pool", "rexft.harness.model -> rexft.cli (below the CLI)",
                                "rexft.inference.pool -> rexft.eval.report", "rexft.serve.local -> rexft.eval.protocols"]
