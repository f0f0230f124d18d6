"""Maps the top-level folders to `zoo.*` packages and lists their subpackages (docs/design.md)."""

from pathlib import Path

from setuptools import setup

PACKAGE_DIRS = {
    "zoo": "zoo",
    "zoo.kernels": "kernels",
    "zoo.layers": "layers",
    "zoo.compression": "compression",
    "zoo.train": "train",
    "zoo.infer": "infer",
    "zoo.configs": "configs",
    "zoo.app": "app",
}


def subpackages(name: str, folder: str) -> list[str]:
    root = Path(__file__).parent / folder
    found = []
    for init in sorted(root.rglob("__init__.py")):
        relative = init.parent.relative_to(root).parts
        found.append(".".join((name, *relative)))
    return found


setup(
    package_dir=PACKAGE_DIRS,
    packages=[p for name, folder in PACKAGE_DIRS.items() for p in subpackages(name, folder)],
)
