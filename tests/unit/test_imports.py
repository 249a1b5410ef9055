"""Import structure of the hpctrain package, checked statically with `ast` (nothing is imported).

The graph has an edge A -> B for every import of hpctrain module B written in module A, at module
level or inside a function: `import x.y`, `from x import y` (an edge to x.y when that is a submodule,
else to x), relative imports resolved. The implicit import of a module's parent packages is not an
edge; only an import written in the source is. Dynamic imports (importlib) are not seen.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every .py under package directory `root` (its name is the top name)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, modules: set[str], top: str) -> set[str]:
    """The package-internal modules that `module` (file `path`) names in its import statements."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if alias.name != "*" and sub in modules else base)
    return {t for t in targets if (t == top or t.startswith(top + ".")) and t in modules and t != module}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = module_names(root)
    names = set(files)
    return {m: _imported(m, p, names, root.name) for m, p in files.items()}


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in a deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return sorted(components)


def _shortest_cycle_through(node: str, graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """node -> ... -> node, shortest, staying inside its strongly-connected component."""
    previous: dict[str, str] = {}
    frontier = [node]
    while frontier:
        following = []
        for current in frontier:
            for child in sorted(graph[current] & members):
                if child == node:
                    path = [current]
                    while path[-1] != node:
                        path.append(previous[path[-1]])
                    return [node, *reversed(path[:-1]), node]
                if child not in previous:
                    previous[child] = current
                    following.append(child)
        frontier = following
    raise AssertionError(f"{node} is in no cycle")


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """One cycle per strongly-connected component with more than one module, as 'a -> b -> a'."""
    cycles = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            cycles.append(" -> ".join(_shortest_cycle_through(component[0], graph, set(component))))
    return cycles


def _check_no_cycles(root: Path) -> None:
    cycles = find_cycles(import_graph(root))
    assert not cycles, "import cycle(s) in {}: {}".format(root.name, "; ".join(cycles))


def test_hpctrain_has_no_import_cycle():
    _check_no_cycles(REPO / "hpctrain")


# ---------------------------------------------------------------- the detector itself

def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path / "pkg"


def test_detector_finds_a_three_module_cycle(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg.sub import b\n",            # from-package import of a submodule
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def f():\n    from ..c import thing\n",     # function-level, relative
        "pkg/c.py": "import json\nimport pkg.a as a\n",             # plain import, aliased
        "pkg/d.py": "from . import a\n",                            # into the cycle, not part of it
    })
    graph = import_graph(root)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"},
                     "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}
    assert find_cycles(graph) == ["pkg.a -> pkg.sub.b -> pkg.c -> pkg.a"]
    try:
        _check_no_cycles(root)
    except AssertionError as e:
        assert "pkg.a -> pkg.sub.b -> pkg.c -> pkg.a" in str(e)
    else:
        raise AssertionError("the cycle was not reported")


def test_detector_passes_an_acyclic_package(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "from pkg import util\nfrom .util import helper\n",  # package -> its submodule
        "pkg/util.py": "import os\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/x.py": "from pkg.util import helper\nimport pkg.sub.y\n",  # the implicit parents: no edges
        "pkg/sub/y.py": "from .. import util\nfrom pkg.sub import CONSTANT\nimport otherpkg.a\n",
    })
    graph = import_graph(root)
    assert graph == {"pkg": {"pkg.util"}, "pkg.util": set(), "pkg.sub": set(),
                     "pkg.sub.x": {"pkg.util", "pkg.sub.y"}, "pkg.sub.y": {"pkg.util", "pkg.sub"}}
    assert find_cycles(graph) == []
    _check_no_cycles(root)


def test_detector_counts_an_explicit_import_of_the_parent_package(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "from pkg.engine import load\n",
        "pkg/engine/__init__.py": "def load():\n    from . import torch\n",
        "pkg/engine/torch.py": "from pkg.engine import load\n",  # written: an edge to the package
    })
    assert find_cycles(import_graph(root)) == ["pkg.engine -> pkg.engine.torch -> pkg.engine"]


def test_detector_reports_each_cycle(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg.b\n",
        "pkg/b.py": "import pkg.a\n",
        "pkg/c.py": "import pkg.d\nimport pkg.a\n",
        "pkg/d.py": "def f():\n    import pkg.c\n",
    })
    assert find_cycles(import_graph(root)) == ["pkg.a -> pkg.b -> pkg.a", "pkg.c -> pkg.d -> pkg.c"]


# Modules that may import a framework: the engines' own packages and the models. Everything else in
# hpctrain/ is framework-neutral, so a TensorFlow engine reuses it without loading torch (and back).
FRAMEWORK_SIDE = ("hpctrain.engine.torch", "hpctrain.engine.tf", "hpctrain.models.resnet", "hpctrain.models.bert",
                  "hpctrain.models.tf")


def neutral_modules() -> list[str]:
    names = module_names(REPO / "hpctrain")
    return sorted(n for n in names if not any(n == s or n.startswith(s + ".") for s in FRAMEWORK_SIDE))


def test_framework_neutral_modules_import_neither_torch_nor_tensorflow():
    mods = neutral_modules()
    assert {"hpctrain.loop", "hpctrain.cli", "hpctrain.checkpoint", "hpctrain.files", "hpctrain.recipes.bert",
            "hpctrain.engine", "hpctrain.pipeline.partition"} <= set(mods)
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {mods!r}:
            importlib.import_module(name)
            loaded = [f for f in ("torch", "tensorflow", "keras", "mpi4py") if f in sys.modules]
            assert not loaded, f"importing {{name}} loaded {{loaded}}"
        print(len({mods!r}))
    """)
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == len(mods) >= 25
