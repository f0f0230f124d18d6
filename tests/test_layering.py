"""The house's one rule: imports only go down the floors, late imports inside functions included.

    kernels <- layers <- compression <- zoo (the model) <- train, infer <- app

compression sits under the model: zoo.model rebuilds quantised layers when it loads a folder.

train and infer are siblings: neither imports the other. A `__main__` module is a command
(`python -m zoo.train` is what torchrun runs), never imported, so it may call the app.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"kernels": 0, "layers": 1, "compression": 2, "zoo": 3, "train": 4, "infer": 4,
          "app": 5, "configs": 0}
FOLDERS = {"zoo.kernels": "kernels", "zoo.layers": "layers", "zoo.compression": "compression",
           "zoo.train": "train", "zoo.infer": "infer", "zoo.app": "app", "zoo.configs": "configs",
           "zoo": "zoo"}


def floor_of(module: str) -> str | None:
    """The floor a dotted `zoo...` module lives on; None for anything outside zoo."""
    parts = module.split(".")
    if parts[0] != "zoo":
        return None
    if len(parts) > 1 and f"zoo.{parts[1]}" in FOLDERS:
        return FOLDERS[f"zoo.{parts[1]}"]
    return "zoo"


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    package = next(name for name, f in FOLDERS.items() if f == folder)
    parts = [*package.split("."), *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from zoo import train` names a floor too
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def source_files() -> list[Path]:
    files = []
    for folder in set(FOLDERS.values()):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def climbing_imports(path: Path) -> list[str]:
    here = FLOORS[_folder(path)]
    bad = []
    for line, module in imported_modules(path):
        floor = floor_of(module)
        if floor is None or floor == _folder(path):
            continue
        if FLOORS[floor] > here or (FLOORS[floor] == here and floor != _folder(path)):
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({floor} floor)")
    return bad


def _folder(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def test_every_floor_has_sources():
    assert {_folder(p) for p in source_files()} == set(FOLDERS.values())


def test_no_import_climbs_a_floor():
    bad = []
    for path in source_files():
        if path.name == "__main__.py":
            continue
        bad += climbing_imports(path)
    assert not bad, "imports that climb:\n" + "\n".join(bad)


@pytest.mark.parametrize(("source", "expected"), [
    ("from zoo.app.bench import harness\n", True),
    ("def f():\n    from zoo.app.demo import main\n", True),
    ("from zoo.infer import generate\n", True),  # a sibling floor
    ("from zoo.kernels import rms_norm\n", False),
    ("from .config import RunConfig\n", False),
    ("from zoo.compression import quantize_model\n", False),
])
def test_the_check_sees_late_and_sibling_imports(tmp_path, monkeypatch, source, expected):
    """The rule itself: a train/ module that imports the app, late or not, or its sibling."""
    fake = ROOT / "train" / "_layering_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert bool(climbing_imports(fake)) is expected


@pytest.mark.parametrize(("source", "expected"), [
    ("from zoo.layers.moe import MoE\n", False),
    ("from zoo.kernels import rms_norm\n", False),
    ("from zoo.model import ZooForCausalLM\n", True),
    ("def f():\n    from zoo.infer import generate\n", True),
])
def test_compression_sits_between_the_layers_and_the_model(monkeypatch, source, expected):
    """compression may import the layers and kernels, never the model or anything above it."""
    fake = ROOT / "compression" / "_layering_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert bool(climbing_imports(fake)) is expected
