"""The package's floors: a module imports only from its own layer or the layers below it."""

import ast
from pathlib import Path

import soundreactor

PACKAGE = Path(soundreactor.__file__).parent

# Lowest first. A module may import from any layer at or below its own; `cli` and `__main__` sit on top.
LAYERS: list[set[str]] = [
    {"config", "noise", "checkpoint", "media", "outputs", "files", "threads", "arguments"},
    {"model", "triton_kernels", "demo_video"},
    {"export"},
    {"engine"},
    {"runtime"},
    {"pipeline", "calibration"},
    {"training", "default_model"},
    {"serving"},
    {"live"},
    {"cli", "__main__", "__init__"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def unit_of(path: Path) -> str:
    """`soundreactor/export/graphs.py` -> 'export'; `soundreactor/media.py` -> 'media'."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_units(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "soundreactor" and len(parts) > 1:
                units.add(parts[1])
    return units


def test_every_unit_has_a_floor():
    units = {unit_of(path) for path in PACKAGE.rglob("*.py")}
    assert units - LEVEL.keys() == set(), "add new modules to LAYERS"


def test_no_module_imports_from_above_its_floor():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        for imported in imported_units(path) - {unit}:
            if LEVEL[imported] > LEVEL[unit]:
                violations.append(f"{path.relative_to(PACKAGE)} imports soundreactor.{imported}")
    assert violations == []
