"""Import structure of the hpctrain package.

The layers, the engines' independence, the framework-free core and the absence of cycles are import-linter
contracts (pyproject.toml, [tool.importlinter]): `lint-imports` runs in `make check` and `make test`, and here.
What a static check cannot see is checked by importing for real: no framework-neutral module loads torch,
TensorFlow, Keras or mpi4py, also through a third-party package (tensorboard's TensorFlow probe, say).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
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


def test_import_contracts_hold():
    tool = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    out = subprocess.run([tool], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "4 kept" in out.stdout, out.stdout[-2000:]


# Modules that may import a framework: the engines' own packages and the models. Everything else in
# hpctrain/ is framework-neutral, so a TensorFlow engine reuses it without loading torch (and back).
FRAMEWORK_SIDE = ("hpctrain.engine.torch", "hpctrain.engine.tf", "hpctrain.models.resnet", "hpctrain.models.bert",
                  "hpctrain.models.tasks",
                  "hpctrain.models.tf")


def neutral_modules() -> list[str]:
    names = module_names(REPO / "hpctrain")
    return sorted(n for n in names if not any(n == s or n.startswith(s + ".") for s in FRAMEWORK_SIDE)
                  and not n.endswith(".__main__"))  # importing a __main__ runs it


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == len(mods) >= 25


def test_no_function_in_hpctrain_is_over_60_lines_without_a_reason():
    """A longer function says why in its docstring ("Long because ...")."""
    import ast
    too_long = []
    for name, path in module_names(REPO / "hpctrain").items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 and "Long because" not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{name}.{node.name}: {lines} lines")
    assert not too_long, too_long
