"""The package's layers: every import of a module of the package goes down (or stays in its own subpackage), no
import circle, and no import of the package's own modules placed inside a function to dodge one.

Floors, top to bottom (each subpackage's __init__ says the same):
    face, tools -> run -> planning -> pipeline -> engines -> loading -> models -> files -> root modules
The root modules (errors, profiles, defaults) hold what every layer shares; the package's own __init__ and
__main__ stand above everything.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowvram_stepvideo"
NAME = "lowvram_stepvideo"
FLOORS = {"face": 8, "tools": 8, "run": 7, "planning": 6, "pipeline": 5, "engines": 4, "loading": 3, "models": 2,
          "files": 1}
ROOT_MODULES = {"errors", "profiles", "defaults"}
TOP = {NAME, f"{NAME}.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(mod: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(module of the package it imports, whether inside a function) for every import statement."""
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_package else mod.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        out += [(t, id(node) in in_function) for t in targets if t == NAME or t.startswith(NAME + ".")]
    return out


def floor(mod: str) -> tuple[int, str]:
    if mod in TOP:
        return 10, "top"
    part = mod.split(".")[1]
    if part in ROOT_MODULES:
        return 0, "root"
    return FLOORS[part], part


def graph() -> dict[str, list[tuple[str, bool]]]:
    mods = modules()
    return {m: imported(m, p, set(mods)) for m, p in mods.items()}


def test_every_subpackage_is_on_a_floor_and_says_what_it_may_import():
    for mod, path in modules().items():
        if mod in TOP or mod.split(".")[1] in ROOT_MODULES:
            continue
        assert mod.split(".")[1] in FLOORS, f"{mod}: a subpackage with no floor in tests/test_layers.py"
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "May import" in doc, f"{path}: the docstring should say what the subpackage may import"


def test_imports_only_go_down():
    wrong = []
    for mod, targets in graph().items():
        here, here_pkg = floor(mod)
        for target, _ in targets:
            there, there_pkg = floor(target)
            if there > here or (there == here and there_pkg != here_pkg):
                wrong.append(f"{mod} -> {target}")
    assert not wrong, "imports that run up or across the floors:\n" + "\n".join(wrong)


def test_no_import_of_the_package_inside_a_function():
    lazy = [f"{mod} -> {t}" for mod, targets in graph().items() if mod not in TOP
            for t, inside in targets if inside]
    assert not lazy, "imports placed inside a function (move them to the top, or down a floor):\n" + "\n".join(lazy)


def test_no_import_circle():
    edges = {m: {t for t, _ in ts if t != m and t not in TOP} for m, ts in graph().items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state:
            circle = visit(m)
            assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_checker_sees_an_upward_and_a_lazy_import(tmp_path):
    """The rules above can fail: a module of files/ importing the pipeline is caught, and so is a function-level
    import."""
    fake = tmp_path / NAME / "files"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("from ..pipeline import phases\n\ndef f():\n    from . import y\n")
    found = imported(f"{NAME}.files.x", fake / "x.py", {f"{NAME}.pipeline.phases", f"{NAME}.files.y"})
    assert found == [(f"{NAME}.pipeline.phases", False), (f"{NAME}.files.y", True)]
    assert floor(f"{NAME}.pipeline.phases")[0] > floor(f"{NAME}.files.x")[0]


def engine_imports(mod: str, path: Path, known: set[str]) -> list[str]:
    return [t for t, _ in imported(mod, path, known) if t == f"{NAME}.engines" or t.startswith(f"{NAME}.engines.")]


def test_the_phases_import_no_engine():
    """pipeline/phases.py reaches block streaming, the speed levers and the tiled decode only through its runtime
    (pipeline/machine.py), so the planner's runtime and the real one run the same phases."""
    mods = modules()
    assert engine_imports(f"{NAME}.pipeline.phases", mods[f"{NAME}.pipeline.phases"], set(mods)) == []


def test_the_checker_sees_an_engine_import_in_the_phases(tmp_path):
    fake = tmp_path / NAME / "pipeline"
    fake.mkdir(parents=True)
    (fake / "phases.py").write_text("from ..engines.tiling import tile_count\nfrom ..engines import streaming\n"
                                    "from ..defaults import SpeedOptions\n")
    known = {f"{NAME}.engines.tiling", f"{NAME}.engines.streaming", f"{NAME}.defaults"}
    assert engine_imports(f"{NAME}.pipeline.phases", fake / "phases.py", known) == [
        f"{NAME}.engines.tiling", f"{NAME}.engines.streaming"]


def test_no_module_over_500_lines():
    long = {mod: n for mod, path in modules().items() if (n := len(path.read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines (split them): {long}"


def test_readme_layout_is_generated_from_the_tree():
    """README.md's layout is what scripts/readme_layout.py writes from the modules' docstrings."""
    import subprocess
    import sys
    script = PACKAGE.parent / "scripts" / "readme_layout.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
