"""docs/architecture.md stays true: every module it names exists, and it names every module of the package."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "interleaf"
DOC = (ROOT / "docs" / "architecture.md").read_text()
NAMED = set(re.findall(r"[\w/]+\.py\b", DOC))


def modules() -> list[str]:
    """The package's modules by their path inside it, but for package files and the command modules."""
    paths = (p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))
    return sorted(p for p in paths if not p.endswith(("__init__.py", "__main__.py")) and not p.startswith("commands/"))


def resolve(name: str) -> list[str]:
    """What a name in the page means: a path inside the package or the repository, else a module's own name."""
    if (PACKAGE / name).is_file() or (ROOT / name).is_file():
        return [name]
    return [m for m in modules() if m.rsplit("/", 1)[-1] == name]


def test_every_named_module_exists():
    assert len(NAMED) > 40
    unknown = sorted(n for n in NAMED if len(resolve(n)) != 1)
    assert unknown == [], "named in docs/architecture.md but not one module of the package: " + ", ".join(unknown)
    # control: a path or a name no module has resolves to none; a module's own name to its path
    assert resolve("sampling/cache.py") == resolve("cache_v2.py") == [] and resolve("train.py") == ["training/train.py"]


def test_every_module_is_named():
    assert len(modules()) > 40 and "pipeline.py" in modules() and "model/transformer.py" in modules()
    missing = [m for m in modules() if m not in NAMED]
    assert missing == [], "modules docs/architecture.md does not place: " + ", ".join(missing)
